"""mailhop: a durable, smuggling-safe SMTP relay."""

__all__ = ["__version__"]
__version__ = "0.1.0"
