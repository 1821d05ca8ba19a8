"""The one exception type the data side raises for problems a user must fix (files, configs)."""


class DataError(RuntimeError):
    """Bad data input: the message names the file or setting and what to do about it."""
