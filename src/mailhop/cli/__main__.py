"""``python -m mailhop.cli``."""

from .main import main

if __name__ == "__main__":  # not when a worker process (multiprocessing) imports the main module
    main()
