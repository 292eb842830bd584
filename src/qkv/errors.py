"""The one exception type qkv raises for problems in the user's input or files, and its default warning."""


class QkvError(Exception):
    """Bad input, a bad file, a bad config: the CLI prints the message alone, without a traceback.

    Messages name the thing and the place, e.g. ``train.de.gz:1234: not valid UTF-8``.
    """


class QkvWarning(UserWarning):
    """What `warn` warns with: the command line prints it as one `qkv: warning: ...` line."""


def warn(message: str, stacklevel: int = 3) -> None:
    """The default for the `warn` callbacks of qkv's functions: a Python warning, reported at the
    caller of the function that warns (the command line prints `qkv: warning: ...` instead)."""
    import warnings

    warnings.warn(message, QkvWarning, stacklevel=stacklevel)
