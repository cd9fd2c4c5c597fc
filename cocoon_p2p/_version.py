"""The package version, in one place (the wheel's metadata reads it too)."""

__version__ = "0.2.0"
