"""A failure in one line a user can act on: what happened, where, and what to run next.

Storage errors reach the command line as wrapped TensorStore or orbax messages of several
hundred characters (``RESOURCE_EXHAUSTED: Error writing ... [OS error: No space left on
device] [os_error_code='28'] ...``). :func:`one_line` finds what they mean; the whole
traceback goes to the workdir's log file instead of the console.
"""

from __future__ import annotations

import errno
import os
import re

from kpn_jax import storage

_NO_SPACE = re.compile(r"No space left on device|os_error_code='?28'?|ENOSPC")
# Where TensorStore says it was writing, most specific first (its first quoted name may be
# an array's key inside the checkpoint, not a path).
_TENSORSTORE_PATHS = (re.compile(r'local file "([^"]+)"'), re.compile(r'Failed writing:? "([^"]+)"'))


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        # ``raise ... from None`` hides the context: it is not what went wrong.
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def first_line(error: BaseException, limit: int = 1000) -> str:
    """The first line of ``error``'s message, at most ``limit`` characters."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def latest_checkpoint_step(workdir: str | os.PathLike) -> int | None:
    """The newest complete ``checkpoints/latest/<step>`` of a workdir (orbax writes into a
    ``<step>.orbax-checkpoint-tmp`` folder and renames it when done)."""
    folder = storage.path(workdir) / "checkpoints" / "latest"
    steps = [int(p.name) for p in folder.glob("*") if p.is_dir() and p.name.isdigit()] \
        if folder.is_dir() else []
    return max(steps) if steps else None


def _resume_words(workdir: str | os.PathLike | None) -> str:
    if workdir is None:
        return "run the same command again"
    step = latest_checkpoint_step(workdir)
    return ("run the same command: it resumes from step "
            f"{step}" if step is not None else "run the same command: it starts afresh "
            "(no checkpoint was completed)")


def one_line(error: BaseException, workdir: str | os.PathLike | None = None,
             log_file: str | os.PathLike | None = None) -> str:
    """``error`` as one line: a full disk or another storage error names the path and
    what to do; anything else is ``Type: first line``."""
    details = f" (details: {log_file})" if log_file else ""
    for link in _chain(error):
        text = str(link)
        is_os_error = isinstance(link, OSError)
        if (is_os_error and link.errno == errno.ENOSPC) or _NO_SPACE.search(text):
            path = (link.filename if is_os_error and link.filename else None)
            found = [m.group(1) for m in (p.search(text) for p in _TENSORSTORE_PATHS) if m]
            path = path or (found[0] if found else None) or workdir or "?"
            return (f"no space left on the device of {path}: free space, then "
                    f"{_resume_words(workdir)}{details}")
        if is_os_error and link.filename and link.strerror:
            return f"{link.strerror}: {link.filename}{details}"
    return f"{type(error).__name__}: {first_line(error)}{details}"
