"""Helpers shared by the tests: real external tools and servers."""
