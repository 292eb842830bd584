"""The one exception type qkv raises for problems in the user's input or files."""


class QkvError(Exception):
    """Bad input, a bad file, a bad config: the CLI prints the message alone, without a traceback.

    Messages name the thing and the place, e.g. ``train.de.gz:1234: not valid UTF-8``.
    """
