"""Settings for training runs small enough for a test on two CPU cores."""

#: A tiny finetune: a small network on a 32-pixel detector with the default field of view.
TINY_TRAINING = {
    "training__backbone": "resnet10t",
    "training__detector_size_px": "32",
    "training__pixel_spacing_mm": str(2.1764375 * 4),
    "training__batch_size": "2",
    "training__gradient_accumulation": "1",
    "training__warmup_iterations": "2",
    "training__profiles": "{}",  # these values, whatever the device
    # Two small held-out views: the check runs, in seconds (its figures mean little here).
    "training__model_check__views": "2",
    "training__model_check__size_px": "64",
    "training__model_check__levels_px": "[16, 32]",
}


def environment(overrides: dict[str, str]) -> dict[str, str]:
    """``section__key`` settings as the node's environment (``XVR_NODE__SECTION__KEY``)."""
    return {f"XVR_NODE__{key.upper()}": value for key, value in overrides.items()}
