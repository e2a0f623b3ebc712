"""Where each recipient goes: routes by recipient domain."""

from .router import Route, Router

__all__ = ["Route", "Router"]
