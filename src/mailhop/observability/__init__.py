"""Logging and, later, metrics."""

from .log import setup_logging

__all__ = ["setup_logging"]
