"""Renderer benchmark: diffdrr against the node's Projector (nanodrr's ray marcher).

    .venv/bin/python bench/renderers.py [--threads 1] [--repeats 5]

At the sizes the registration levels render (32, 64 and 128 px on a 512-px detector, the CT
block-averaged to each level's pixel footprint, as ``Registrar`` does), one render plus the
backward pass through the view, on diffdrr's example chest CT: the operation every refinement
step repeats. Fidelity is each renderer's line integrals against the Projector finely sampled
(0.1 voxel steps): the relative maximum error and the correlation.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from xvr_node.geometry import CarmPose, Intrinsics
from xvr_node.phantom import example_ct
from xvr_node.xvr.register import RefineSettings, Registrar, downsample_volume
from xvr_node.xvr.renderer import Projector, hu_to_density

DETECTOR = Intrinsics(1100.0, 512, 512, 0.6, 0.6)


def diffdrr_renderer(volume, intrinsics: Intrinsics, shape: tuple[int, int]):
    """diffdrr's trilinear DRR for the level (what the node used before the Projector)."""
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from diffdrr.pose import RigidTransform
    from torchio import ScalarImage

    rows, columns = shape
    # The level's detector, as the Registrar placed it for diffdrr.
    detector = intrinsics.resampled(rows, columns)
    frame = volume.frame("PA")
    image = ScalarImage(
        tensor=torch.as_tensor(volume.hu, dtype=torch.float32)[None], affine=volume.affine_ras
    )
    subject = read(image, None, orientation="PA")
    subject.density.set_data(hu_to_density(subject.volume.data))
    x0, y0 = detector.diffdrr_offsets(frame.reverse_x_axis)
    drr = DRR(
        subject,
        sdd=detector.sid_mm,
        height=rows,
        width=columns,
        delx=detector.column_spacing_mm,
        dely=detector.row_spacing_mm,
        x0=x0,
        y0=y0,
        reverse_x_axis=frame.reverse_x_axis,
        renderer="trilinear",
    )
    points = int(
        np.ceil(
            np.linalg.norm(np.array(volume.hu.shape) * volume.spacing_mm) / volume.spacing_mm.min()
        )
    )

    def render(matrix: torch.Tensor) -> torch.Tensor:
        # Poses of the full detector's image plane, as the matrices are.
        left, right = (
            torch.as_tensor(m, dtype=torch.float32) for m in frame.pose_factors(intrinsics)
        )
        pose = torch.linalg.inv(left) @ matrix @ torch.linalg.inv(right)
        return drr(RigidTransform(pose), n_points=points)

    return render, points


def timed(render, matrix: np.ndarray, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of one render plus backward through the matrix, and the image."""
    times = []
    for _ in range(repeats + 1):
        view = torch.as_tensor(matrix, dtype=torch.float32)[None].requires_grad_(True)
        started = time.perf_counter()
        image = render(view)
        image.sum().backward()
        times.append(time.perf_counter() - started)
    return float(np.median(times[1:])), image.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    volume = example_ct()
    registrar = Registrar(volume, RefineSettings(levels_px=(32, 64, 128)))
    matrix = CarmPose(-20.0, 15.0, 760.0, tuple(volume.center_lps)).to_matrix(DETECTOR)
    print(
        "| level | CT voxels | renderer | samples/ray | ms (render + backward) | max error | corr |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for scale in registrar.settings.scales_for(DETECTOR):
        shape = registrar._size_at(DETECTOR, scale)
        level = downsample_volume(volume, registrar._volume_factors(DETECTOR, scale))
        reference = Projector(level, DETECTOR, shape, step_voxels=0.1).render_numpy(matrix)
        candidates = {"diffdrr trilinear": diffdrr_renderer(level, DETECTOR, shape)}
        for step in (1.0, 1.5, 2.0):
            projector = Projector(level, DETECTOR, shape, step_voxels=step)
            candidates[f"Projector, step {step} voxel"] = (projector, projector.samples)
        for name, (render, samples) in candidates.items():
            seconds, image = timed(render, matrix, args.repeats)
            error = float((image - reference).abs().max() / reference.abs().max())
            corr = float(np.corrcoef(image.flatten(), reference.flatten())[0, 1])
            print(
                f"| {shape[0]} px | {'×'.join(map(str, level.hu.shape))} | {name} | {samples} "
                f"| {1000 * seconds:.0f} | {100 * error:.2f} % | {corr:.6f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
