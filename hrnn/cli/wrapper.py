"""The one way a command line ends on a user's mistake or a machine's fault: `error: <message>` on one line, exit status 2."""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, TypeVar

from hrnn.errors import UserError, os_error_cause

EXIT_USER_ERROR = 2
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Wrap a command's entry (or a Hydra task function): a UserError out of it is printed as
    `error: <message>` on stderr and ends the process with status 2 (SystemExit), no traceback.
    So is an OSError no layer turned into one (a disk that fills, a folder made read-only): it names
    its path and cause, since the machine, not the program, is at fault.
    HYDRA_FULL_ERROR=1 (hrnn-train --verbose) lets either through with its traceback instead."""

    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (UserError, OSError) as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {exc if isinstance(exc, UserError) else _os_fault(exc)}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapped  # type: ignore[return-value]


def _os_fault(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    return f"cannot access{where}: {os_error_cause(exc)}; files written before are intact"
