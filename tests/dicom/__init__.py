"""Tests of the DICOM layer."""
