"""The one exception type for mistakes a user can make (bad files, bad input, bad options).

Everything raised as `FluxMinimalError` carries a message that says what is wrong and what to do;
the command-line tools print it without a traceback and exit non-zero. Bugs stay ordinary
exceptions, with their tracebacks.
"""

import sys
from typing import Callable


class FluxMinimalError(Exception):
    """A problem the user can fix: the message says which file, key, size or option, and how."""


class WeightsError(FluxMinimalError):
    """A weights file or folder is missing, truncated, of the wrong model, or has wrong keys/shapes."""


def run_cli(main: Callable[[], int]) -> None:
    """Run a command-line `main`: a FluxMinimalError becomes one line on stderr and exit status 2
    (no traceback: the message already says what to do); Ctrl-C exits with 130."""
    try:
        sys.exit(main())
    except FluxMinimalError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
