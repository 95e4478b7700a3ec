"""The project's error class for a user's mistake (no TensorFlow import: the library, the trainer
and the tools all raise it).

A bad flag, hyperparameter, file or dataset raises `UserError` (or one of its subclasses:
`msa_xla.data.DataError`, `StrategyError`, `PrecisionError`, `CheckpointError`). The commands print
its first line as `error: ...` and exit 2 (msa_xla/cli.py); any other exception is a bug and keeps
its traceback.

    >>> issubclass(UserError, ValueError)
    True
"""


class UserError(ValueError):
    """A user's mistake, explained in its first line (which names the offending value).

    A ValueError, so callers that catch ValueError keep working; the commands catch only this
    class, so a programming error's ValueError is never shortened to one line.
    """
