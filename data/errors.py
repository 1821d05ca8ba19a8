"""The one exception type the data side raises for problems a user must fix (files, configs)."""

from mimo.recipes.errors import MimoError


class DataError(MimoError, RuntimeError):
    """Bad data input: the message names the file or setting and what to do about it."""
