"""Tests of the XVR method."""
