"""``python -m mailhop.cli``."""

from .main import main

main()
