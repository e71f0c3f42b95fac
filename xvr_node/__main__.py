"""Allow ``python -m xvr_node``."""

from xvr_node.cli import main

main()
