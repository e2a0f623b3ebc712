"""Outbound delivery. Never imports mailhop.server."""
