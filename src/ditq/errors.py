"""Errors ditq raises for bad input: each names the file, tensor or argument and what was expected."""

from __future__ import annotations


class DitqError(Exception):
    """Base class: the CLI prints these as one line and exits with `exit_code`: 2 for a usage or file error (a
    missing or corrupt file, an argument out of range), 1 for input that was read but is invalid (`InvalidInputError`).
    Anything else that escapes is a crash, reported with its traceback and status 70."""

    exit_code = 2


class InvalidInputError(DitqError):
    """Input that was read but breaks a rule (a caption that breaks the caption rules, a run that went non-finite):
    exit status 1."""

    exit_code = 1


class ModelSourceError(DitqError):
    """A model id, folder or component could not be resolved."""


class CheckpointError(DitqError):
    """A checkpoint file is missing, corrupt, or holds a tensor of the wrong name, shape, dtype or value."""


class ConfigError(DitqError, ValueError):
    """A configuration field or CLI argument is out of range."""


class NonFiniteError(InvalidInputError):
    """Generation produced a non-finite value; the message names the variant, the step and the first module."""
