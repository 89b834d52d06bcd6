"""One exception type for every user-facing problem.

A :class:`DmmiError` carries one line that names the problem (which file, which field,
which sentence). The CLI prints it without a traceback and exits with status 2.
"""


class DmmiError(Exception):
    """A user-facing error with a one-line message."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)
