"""``python -m edgekit``: the same command line as ``edgekit``."""

from edgekit.cli import main

main()
