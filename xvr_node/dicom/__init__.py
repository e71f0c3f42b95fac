"""DICOM objects the node reads and writes, and its network services."""
