"""The one exception type for mistakes a user can make (bad files, bad input, bad options).

Everything raised as `FluxMinimalError` carries a message that says what is wrong and what to do;
the command-line tools print it without a traceback and exit non-zero. Bugs stay ordinary
exceptions, with their tracebacks.
"""


class FluxMinimalError(Exception):
    """A problem the user can fix: the message says which file, key, size or option, and how."""


class WeightsError(FluxMinimalError):
    """A weights file or folder is missing, truncated, of the wrong model, or has wrong keys/shapes."""
