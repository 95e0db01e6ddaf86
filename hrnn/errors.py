"""The one exception type that reaches the user as a single line instead of a traceback, and the words for an OS fault."""
from __future__ import annotations

import errno
import os


class UserError(Exception):
    """A mistake in the user's input (config, data, paths): printed as `error: <message>`."""


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, or the one a library wrapped (torch.save turns a failed write
    into a RuntimeError whose context is the OSError)."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__
    return exc


def os_error_cause(exc: OSError) -> str:
    """An OSError's cause in words and by errno name, e.g. `No space left on device (ENOSPC)`."""
    name = errno.errorcode.get(exc.errno or 0)
    words = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__)
    return f"{words} ({name})" if name else words
