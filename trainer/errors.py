"""The one error path of every entry point (OpenVLA_GRPO.py's subcommands and scripts/*.py).

A failure the user can cause (a config that cannot work, a missing or damaged file, a full or read-only disk, a
run that diverged) is raised as a ValueError, an OSError or a UserError whose message names the thing and the
fix, where the problem is found. The entry point turns it into one line on stderr and exit status 1; with
--traceback or OPENVLA_GRPO_TRACEBACK=1 the exception propagates with its full traceback, for bug reports. Any
other exception is a bug and always shows its traceback.
"""

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "OPENVLA_GRPO_TRACEBACK"


class UserError(Exception):
    """A failure the user can fix that is neither a bad value (ValueError) nor a file problem (OSError), such as
    a run whose optimizer steps keep being skipped."""


USER_ERRORS = (ValueError, OSError, UserError)


def traceback_requested(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether the full traceback is wanted (--traceback anywhere in argv, or OPENVLA_GRPO_TRACEBACK=1), and argv
    without that flag."""
    rest = [arg for arg in argv if arg != TRACEBACK_FLAG]
    return len(rest) < len(argv) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"), rest


@contextmanager
def one_line_errors(program: str, show_traceback: bool) -> Iterator[None]:
    """Exits with `<program>: error: <message>` (one line, status 1) on a user error raised inside the block."""
    try:
        yield
    except USER_ERRORS as error:
        if show_traceback:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        sys.exit(f"{program}: error: {message}")
