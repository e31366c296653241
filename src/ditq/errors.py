"""Errors ditq raises for bad input: each names the file, tensor or argument and what was expected."""

from __future__ import annotations


class DitqError(Exception):
    """Base class: the CLI prints these as one line and exits with status 2."""


class ModelSourceError(DitqError):
    """A model id, folder or component could not be resolved."""


class CheckpointError(DitqError):
    """A checkpoint file is missing, corrupt, or holds a tensor of the wrong name, shape, dtype or value."""


class ConfigError(DitqError, ValueError):
    """A configuration field or CLI argument is out of range."""


class NonFiniteError(DitqError):
    """Generation produced a non-finite value; the message names the variant, the step and the first module."""
