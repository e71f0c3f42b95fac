"""Tests of the catalog database layer."""
