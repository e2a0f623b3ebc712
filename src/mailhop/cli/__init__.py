"""The ``mailhop`` command."""
