"""Exceptions that mean "the input is wrong"; the CLI turns them into exit code 2."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """An invalid configuration value; the message names the field and the fix."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, corrupt, unsafe or does not match the model."""


class DatasetUnavailable(UserError):
    """A data set is not installed or a data folder cannot be read."""
