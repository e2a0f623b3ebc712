"""Fuzz targets for mailhop's untrusted-input parsers (see README.md)."""
