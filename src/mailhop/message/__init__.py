"""Message content: header scanning, trace headers."""

from .headers import HeaderScanner, received_header

__all__ = ["HeaderScanner", "received_header"]
