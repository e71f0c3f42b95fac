"""The one command-line entry point: ``xvr-node``, a module per command group."""

from __future__ import annotations

from xvr_node.cli import configuration, demo, exports, jobs, method, service, training
from xvr_node.cli.root import cli

__all__ = ["cli", "main"]

# Importing a module adds its commands to ``cli``.
COMMAND_MODULES = (configuration, service, jobs, method, training, exports, demo)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="xvr-node")
