"""The one exception hierarchy of hbi-toolkit.

Every error a user can cause is an :class:`HbiError`. Each subclass carries an exit code (see
docs/architecture.md, "Errors and exit codes") and an optional ``hint`` that tells the user what to do
next. The CLIs turn these into a one-line message (or ``{"error": ...}`` in JSON mode) and exit with
``exit_code``; anything that is *not* an ``HbiError`` is a bug and exits 1 (traceback with ``--debug``).
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_MISMATCH = 4
EXIT_GATE_FAILED = 5


class HbiError(Exception):
    """Base of every error the toolkit raises on purpose.

    Args:
        message: what went wrong, in one sentence, naming the file / key / value at fault.
        hint: the next step for the user (optional).
    """

    exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_json(self) -> dict:
        return {"type": type(self).__name__, "message": self.message, "hint": self.hint}


class UsageError(HbiError):
    """A command or function was called with arguments that cannot work together."""

    exit_code = EXIT_USAGE


class BadInputError(HbiError):
    """A file, folder, query or tensor given by the user is unreadable or malformed."""

    exit_code = EXIT_BAD_INPUT


class CheckpointError(BadInputError):
    """A checkpoint cannot be understood: unknown format, missing / unexpected / mis-shaped keys."""


class ConfigError(BadInputError):
    """A model configuration is invalid or inconsistent."""


class ServerUnavailableError(BadInputError):
    """A server named by the user (``--triton-url``) did not answer, after the bounded retries."""


class MismatchError(HbiError):
    """Two artifacts do not belong together (package vs index, engine vs GPU, schema versions)."""

    exit_code = EXIT_MISMATCH


class GateFailedError(HbiError):
    """A parity or accuracy gate failed."""

    exit_code = EXIT_GATE_FAILED


class MissingDependencyError(UsageError):
    """An optional dependency (torch, onnxruntime, tensorrt, ...) is needed but not installed."""


# What the machine said no to, in words: an OSError with one of these errnos is the environment (a full disk, a
# file size limit, a read-only mount), never a bug; the CLIs report it as bad input (exit 3) with the next step.
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EFBIG: "a file grew past the file size limit (ulimit -f)",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EIO: "an I/O error"}


def environment_error(exc: OSError, doing: str, hint: str | None = None) -> BadInputError | None:
    """A :class:`BadInputError` for an OSError the machine caused (:data:`DISK_ERRNOS`), else None.

    Args:
        exc: the error. doing: what failed, e.g. "cannot write the index /x".
        hint: the next step (default: free space or fix permissions, then run the command again).
    """
    what = DISK_ERRNOS.get(exc.errno)
    if what is None:
        return None
    where = f": {exc.filename}" if exc.filename else ""
    return BadInputError(f"{doing}: {what} ({exc.strerror}{where})",
                         hint=hint or "free space or fix the permissions, then run the command again")
