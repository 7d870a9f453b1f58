"""Files and folders, written safely.

- :func:`write_atomic`: one file written atomically: a temporary file in the same folder, fsync, then rename over
  the target. Readers see the old file or the new one, never half of one, and an interrupted write leaves the
  target as it was. The new file gets the permissions a plain ``open(path, "w")`` would give (``0o666`` less the
  umask), not ``mkstemp``'s private ``0o600``: manifests and engines are shared artifacts.
- :func:`replace_dir`: a complete folder swapped into place, the previous one deleted only once the new one is
  there (what :mod:`hbi_runtime.outputs` builds every exporter's ``--out`` on).
- :func:`user_cache_dir`: where derived files that are cheap to rebuild are kept (BPE tables, optimized ONNX
  Runtime graphs).

Names in messages are shown with :func:`hbi_runtime.names.display_path`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

from hbi_runtime.names import display_path


def user_cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/hbi-toolkit/<parts>`` (``~/.cache`` by default); not created here."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "hbi-toolkit", *parts)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def replace_dir(new: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move the complete folder ``new`` to ``out``; returns ``out``.

    An existing ``out`` (a folder, or a symlink, which is replaced, not followed) is renamed aside first and deleted
    only once ``new`` is in place; when that second rename fails it is renamed back before the error propagates.
    ``new`` and ``out`` must be siblings (one file system). A crash between the two renames leaves both complete
    folders on disk (see :mod:`hbi_runtime.outputs`).

    Raises:
        OSError: a rename failed (``out`` is then as it was).
        HbiError: the second rename failed and so did renaming the previous ``out`` back; the message says where
            it is.
    """
    new, out = Path(new), Path(out)
    if not os.path.lexists(out):
        os.rename(new, out)
        return out
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException as exc:
        try:
            os.rename(old, out)
        except OSError as again:
            from hbi_runtime.errors import HbiError

            raise HbiError(f"could not move the new {display_path(out)} into place ({exc}), nor the previous one back "
                           f"({again.strerror}): the previous one is {display_path(old)}",
                           hint=f"rename {display_path(old)} back to {display_path(out)}") from exc
        raise
    if old.is_symlink() or not old.is_dir():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)
    return out
