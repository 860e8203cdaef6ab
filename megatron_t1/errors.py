"""Errors that are the user's to fix (bad config, data or checkpoint): the CLI prints them on one
line and exits non-zero instead of a traceback. No torch or megatron import here."""


class CheckpointError(RuntimeError):
    """A missing, partial or incompatible checkpoint (the message names the folder)."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite steps in a row); the message says why and what
    to do."""
