"""One exception type for every user-facing problem.

A :class:`DmmiError` carries one line that names the problem (which file, which field,
which sentence). The CLI prints it without a traceback and exits with status 2.
"""

import unicodedata

_HIDDEN = {"Cc", "Cf", "Cs"}  # control, format, surrogate (os.fsdecode's escapes)


def printable(text: str) -> str:
    """``text`` safe to echo on a terminal: control and format characters (ESC, NUL, CR, LF,
    bidi overrides, ...) and undecodable file-name bytes become visible escapes such as
    ``\\x1b``, ``\\u202e`` or ``\\udcff``."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _HIDDEN else c
                   for c in str(text))


class DmmiError(Exception):
    """A user-facing error with a one-line message (control characters shown escaped)."""

    def __init__(self, message: str):
        message = printable(" ".join(str(message).split()))  # always one line, nothing for the terminal to run
        super().__init__(message)
