"""Shared fixtures: the phantom patient, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from xvr_node.phantom import PhantomSpec, build_phantom


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small phantom with every feature: bead, RAO mirroring, non-square, XA+RF, cine."""
    outdir = tmp_path_factory.mktemp("phantom")
    spec = PhantomSpec(
        seed=3,
        frames=4,
        columns=128,
        rows=112,
        multiframe=3,
        motion="dynamic",
        orientation="PA",
        modality="both",
        flip=True,
        bead=True,
        ct_downsample=2,
    )
    build_phantom(outdir, spec)
    return outdir
