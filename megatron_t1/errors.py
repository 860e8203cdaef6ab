"""Errors that are the user's to fix (bad config, data or checkpoint): the CLI prints them on one
line and exits non-zero instead of a traceback. No torch or megatron import here."""


class CheckpointError(RuntimeError):
    """A missing, partial or incompatible checkpoint (the message names the folder)."""
