"""The pose-regression network: a timm backbone with a rotation head and a translation head."""

from __future__ import annotations

import math

import timm
import torch
from diffdrr.pose import RigidTransform, convert
from timm.layers import BatchNormAct2d, GroupNormAct

from xvr_node.xvr.augment import normalize_image
from xvr_node.xvr.sampling import ROTATION_SIZE, pose_parameters

#: The translation head works in metres; poses are in millimetres.
TRANSLATION_SCALE = 1000.0

#: Largest number of channel groups in group norm (timm's and the reference's default).
MAX_GROUPS = 32


def _group_count(channels: int, norm: str) -> int:
    return channels if norm == "instance" else math.gcd(channels, MAX_GROUPS)


def replace_batch_norm(module: torch.nn.Module, norm: str) -> torch.nn.Module:
    """Swap every BatchNorm2d for GroupNorm (``group``) or per-channel GroupNorm (``instance``).

    Done on the built model so any timm backbone works, whether or not its constructor takes
    a ``norm_layer``. Batch statistics are what we avoid: training batches mix views of very
    different anatomy, and prediction runs on one image at a time.
    """
    if norm == "batch":
        return module
    for name, child in module.named_children():
        if isinstance(child, BatchNormAct2d):
            groups = _group_count(child.num_features, norm)
            new = GroupNormAct(child.num_features, groups, eps=child.eps, affine=child.affine)
            new.act, new.drop = child.act, child.drop
        elif isinstance(child, torch.nn.BatchNorm2d):
            groups = _group_count(child.num_features, norm)
            new = torch.nn.GroupNorm(groups, child.num_features, eps=child.eps, affine=child.affine)
        else:
            replace_batch_norm(child, norm)
            continue
        if child.affine:
            with torch.no_grad():
                new.weight.copy_(child.weight)  # keeps timm's zero-init of residual branches
                new.bias.copy_(child.bias)
        setattr(module, name, new)
    return module


class PoseRegressor(torch.nn.Module):
    """X-ray (B, 1, H, W) → camera pose, as diffdrr's ``RigidTransform``.

    ``forward`` expects images already normalised by :func:`normalize_image`;
    :meth:`predict_pose` takes raw images and does the normalisation itself.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        parameterization: str = "quaternion_adjugate",
        norm: str = "group",
        in_chans: int = 1,
        image_size: int = 128,
        convention: str = "ZXY",
    ) -> None:
        super().__init__()
        if parameterization not in ROTATION_SIZE:
            raise ValueError(f"parameterization must be one of {sorted(ROTATION_SIZE)}")
        if norm not in ("group", "batch", "instance"):
            raise ValueError(f"norm must be 'group', 'batch' or 'instance', not {norm!r}")
        self.backbone_name = backbone
        self.parameterization = parameterization
        self.convention = convention
        self.norm = norm
        self.in_chans = in_chans
        self.image_size = image_size
        # pretrained=False always: the node never downloads weights.
        self.backbone = replace_batch_norm(
            timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans), norm
        )
        features = self.backbone.num_features
        self.rotation_head = torch.nn.Linear(features, ROTATION_SIZE[parameterization])
        self.translation_head = torch.nn.Linear(features, 3)

    @property
    def config(self) -> dict:
        """The constructor's arguments, to rebuild the network from a checkpoint."""
        return {
            "backbone": self.backbone_name,
            "parameterization": self.parameterization,
            "norm": self.norm,
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            "convention": self.convention,
        }

    def regress(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw head outputs: rotation components and translation in mm."""
        features = self.backbone(image)
        return (
            self.rotation_head(features),
            TRANSLATION_SCALE * self.translation_head(features),
        )

    def forward(self, image: torch.Tensor) -> RigidTransform:
        rotation, translation = self.regress(image)
        convention = self.convention if self.parameterization == "euler_angles" else None
        return convert(
            rotation, translation, parameterization=self.parameterization, convention=convention
        )

    def start_at(self, pose: RigidTransform, spread: float = 0.1) -> None:
        """Make the untrained network predict ``pose`` (the nominal view), give or take.

        Head biases are set to the pose's parameters and the head weights shrunk by
        ``spread``, so the first predicted DRRs show anatomy and the image loss has a
        gradient from the first step instead of rendering empty views from random poses.
        """
        rotation, translation = pose_parameters(pose, self.parameterization, self.convention)
        with torch.no_grad():
            self.rotation_head.bias.copy_(rotation[0])
            self.translation_head.bias.copy_(translation[0] / TRANSLATION_SCALE)
            self.rotation_head.weight.mul_(spread)
            self.translation_head.weight.mul_(spread)

    @torch.no_grad()
    def predict_pose(self, image: torch.Tensor) -> RigidTransform:
        """Poses of raw X-rays (B, 1, H, W) or one (H, W), already resampled to the model's grid."""
        if image.dim() == 2:
            image = image[None, None]
        if image.dim() != 4 or image.shape[1] != self.in_chans:
            raise ValueError(
                f"expected (B, {self.in_chans}, H, W) images, got {tuple(image.shape)}"
            )
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"the model was trained on {self.image_size}x{self.image_size} images, got "
                f"{image.shape[-2]}x{image.shape[-1]}: resample to the model's intrinsics first"
            )
        parameter = next(self.parameters())
        image = image.to(device=parameter.device, dtype=parameter.dtype)
        was_training = self.training
        self.eval()
        try:
            return self(normalize_image(image))
        finally:
            self.train(was_training)
