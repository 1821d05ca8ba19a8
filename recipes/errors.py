"""The one base of every error mimo reports to a user, and the error of a recipe that does not compose.

Each concern has its own subclass next to its code (``LayoutError`` in parallel, ``DataError`` in data,
``CheckpointError`` in train, ...). Commands catch ``MimoError`` and print ``<command>: error: <message>`` with
exit status 2: the message names the key, file or value and the fix. Any other exception is a bug in mimo or a
library and keeps its traceback. This module imports nothing of mimo's, so every layer can raise these, and every
command (in whichever package) maps them the same way with ``run_command``.
"""

import sys
from collections.abc import Callable

USAGE_ERROR = 2
"""Exit status of a command refused for a problem the user can fix (the argparse convention)."""


class MimoError(Exception):
    """A problem the user can fix (config, layout, data, checkpoint, model); the message says how."""


class ConfigError(MimoError, ValueError):
    """A recipe or override that cannot be composed into a valid config."""


def run_command(prog: str, action: Callable[[], object]) -> int:
    """Run a command's work: 0 when it succeeds, 2 with ``<prog>: error: ...`` on stderr for a MimoError. Any
    other exception is a bug and propagates with its traceback."""
    try:
        action()
    except MimoError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    return 0
