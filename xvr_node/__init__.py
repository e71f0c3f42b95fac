"""xvr-node: a DICOM node for rapid patient-specific 2D/3D X-ray-to-CT registration."""

__version__ = "0.1.0"
