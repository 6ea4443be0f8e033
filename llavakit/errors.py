"""Errors a user of llavakit can see.

Every problem with user input (files, prompts, configs, checkpoints) raises `InputError`, a
`ValueError` whose message says what was wrong and what would be accepted instead.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a message a person understands; nothing was changed or lost."""


class CheckpointError(InputError):
    """A checkpoint directory/file is missing pieces, corrupt, or of an unsupported architecture."""


class TrainingError(RuntimeError):
    """A training run cannot go on (e.g. the loss keeps diverging); its last checkpoint is intact."""
