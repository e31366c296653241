"""The ditq version, importable from every layer without importing the package API."""

__version__ = "0.1.0"
