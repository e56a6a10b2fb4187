"""Exceptions that carry a message meant for the user (the CLI prints them without a traceback)."""


class VlpbenchError(Exception):
    """Base class: the message names the file, row or key at fault and what was expected."""


class DataError(VlpbenchError):
    """A dataset file is missing, malformed or undecodable."""


class CheckpointError(VlpbenchError):
    """A checkpoint cannot be loaded safely or does not match the adapter's key layout."""


class ConfigError(VlpbenchError):
    """A task, option or override is invalid."""
