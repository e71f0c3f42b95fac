"""The open field: each source masks what it says, and the image detector finds unstated ones."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from scipy import ndimage

from xvr_node.xvr.field import detect_open_field, field_of_view

ROWS, COLUMNS = 120, 100


def anatomy(seed: int = 0) -> np.ndarray:
    """A smooth, textured 'patient' on a LIN scale: bright lung fields, darker mediastinum."""
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.normal(size=(ROWS, COLUMNS)), 4.0)
    texture = (texture - texture.min()) / np.ptp(texture)
    columns = np.linspace(-1, 1, COLUMNS)
    mediastinum = np.exp(-(columns**2) / 0.1)[None, :]
    return 800.0 + 2400.0 * texture * (1.0 - 0.6 * mediastinum) + rng.normal(0, 20, (ROWS, COLUMNS))


def test_collimator_edges_are_one_based():
    ds = Dataset()
    ds.CollimatorShape = "RECTANGULAR"
    ds.CollimatorLeftVerticalEdge, ds.CollimatorRightVerticalEdge = 11, 90
    ds.CollimatorUpperHorizontalEdge, ds.CollimatorLowerHorizontalEdge = 21, 100
    view = field_of_view(ds, anatomy(), detect=False)
    assert view.sources == ["collimator"]
    top, bottom, left, right = view.bounds()
    margin = 2  # the minimum margin inside every stated edge
    # Row 21, column 11 (1-based) are the first open ones: 0-based 20 and 10.
    assert (top, left) == (20 + margin, 10 + margin)
    assert (bottom, right) == (100 - margin, 90 - margin)


def test_circular_and_polygonal_display_shutters_mask_what_they_say():
    ds = Dataset()
    ds.ShutterShape = "CIRCULAR\\POLYGONAL"
    ds.CenterOfCircularShutter = [61, 51]  # row, column, 1-based
    ds.RadiusOfCircularShutter = 40
    # A polygon cutting off the left side: (row, column) pairs, 1-based.
    ds.VerticesOfThePolygonalShutter = [1, 30, 120, 30, 120, 100, 1, 100]
    view = field_of_view(ds, anatomy(), detect=False)
    assert view.sources == ["shutter"]
    assert view.mask[60, 50]  # the centre
    assert not view.mask[60, 50 + 42]  # beyond the radius
    assert not view.mask[60, 20]  # inside the circle, left of the polygon's edge
    assert view.mask[60, 40]


@pytest.mark.parametrize("dark", [True, False])
def test_an_unstated_intensifier_circle_is_found_in_the_image(dark):
    image = anatomy(1)
    yy, xx = np.mgrid[0:ROWS, 0:COLUMNS]
    truth = (yy - 58) ** 2 + (xx - 51) ** 2 <= 46**2
    outside = 120.0 if dark else 3900.0  # LIN lead shadow, or a LOG/inverted bright ring
    image = np.where(truth, image, outside + np.random.default_rng(2).normal(0, 5, image.shape))
    mask = detect_open_field(image)
    assert mask is not None
    assert (mask & ~truth).sum() < 0.01 * (~truth).sum()  # next to no shutter counted
    assert (truth & ~mask).sum() < 0.05 * truth.sum()  # and most of the field kept


def test_dark_anatomy_at_a_collimator_edge_stays_inside_the_field():
    image = anatomy(3)
    image[60:, 20:60] = 140.0  # dense anatomy reaching the lower shutter, as dark as lead
    truth = np.zeros(image.shape, dtype=bool)
    truth[10:110, 8:92] = True
    image = np.where(truth, image, 130.0)
    mask = detect_open_field(image)
    assert mask is not None
    assert (mask & ~truth).sum() == 0
    assert mask[100, 40]  # the dark anatomy inside the field
    assert mask.sum() > 0.9 * truth.sum()


def test_an_open_detector_has_no_detected_field():
    assert detect_open_field(anatomy(4)) is None
    view = field_of_view(Dataset(), anatomy(4))
    assert view.sources == [] and view.mask.all()
