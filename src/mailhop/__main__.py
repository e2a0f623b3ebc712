"""``python -m mailhop``."""

from .cli.main import main

main()
