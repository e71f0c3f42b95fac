"""A small phantom for the method's tests: 64-pixel X-rays of a 4x downsampled CT."""

from __future__ import annotations

from pathlib import Path

import pytest

from xvr_node.phantom import PhantomSpec, build_phantom


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("small-phantom")
    build_phantom(
        outdir,
        PhantomSpec(
            seed=7, frames=2, columns=64, rows=64, multiframe=3, motion="dynamic", ct_downsample=4
        ),
    )
    return outdir
