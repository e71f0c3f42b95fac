"""Turning catalog rows into work: queueing jobs and running them."""
