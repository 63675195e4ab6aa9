"""rofs: a copy-on-write FUSE overlay for read-only roots."""

__version__ = "0.1.0"
