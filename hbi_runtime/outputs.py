"""The rules every exporter's ``--out`` / ``--overwrite`` follows: never an input, never a folder that is not an
artifact of the kind written, never a half-written or lost artifact (:func:`prepare_output_dir`,
:func:`staged_output_dir`, on :func:`hbi_runtime.fileio.replace_dir`). Packages are recognised by the one package
reader (:func:`hbi_runtime.package.detect_kind`), in their current and older forms.

Names in messages are shown with :func:`hbi_runtime.names.display_path`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from hbi_runtime.fileio import _umask, replace_dir
from hbi_runtime.names import display_path
from hbi_runtime.package import detect_kind


# ----------------------------------------------------------------------------------------------------------------
# Output folders of the exporters (``--out`` / ``--overwrite``)
#
# Every command that writes an artifact folder (hbi-export onnx, convert, init, qa-export, calibrate; hbi-train
# caption --export, caption-export, caption-joint --export, caption-joint-export, qa export, qa demo; python -m
# hbi_training.demo) follows the same rules, through :func:`prepare_output_dir` and :func:`staged_output_dir`:
#
# - ``--out`` may not be, lie inside, or contain any input of the command (files and folders it reads; compared as
#   resolved real paths, so a symlink to an input is the input);
# - ``--out`` may not be an existing file (or anything else that is not a folder);
# - an existing non-empty folder is replaced only with ``--overwrite`` and only when it holds an artifact of the
#   kind being written (:data:`ARTIFACT_KINDS`, recognised by its manifest); any other non-empty folder is refused
#   even with ``--overwrite``; an empty folder is always fine;
# - the new artifact is written into a temporary sibling folder (``.NAME.partial-XXXX``) and swapped in only once
#   it is complete (:func:`replace_dir`), so a failed or interrupted export leaves the previous artifact as it was.
#
# The swap is two renames in the same folder: the previous artifact to ``.NAME.old-PID-XXXX``, then the new one to
# NAME; the previous one is deleted after that. A process killed between the two renames leaves NAME missing and
# both complete artifacts beside it (rename ``.NAME.old-*`` back to NAME to restore the previous one); a failed
# second rename is undone at once. At no point is neither artifact on disk. Not covered: a power loss (the renames
# are not fsynced), and a folder changed by someone else while the export runs (it is checked when the command
# starts; what NAME holds at the swap is what is replaced).


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _package_of_kind(kind: str) -> Callable[[Path], bool]:
    """A folder holding a package of ``kind`` in any form, new or older, as the one package reader identifies it
    (:func:`hbi_runtime.package.detect_kind`: by the manifest's form; nothing else is checked)."""
    def holds(path: Path) -> bool:
        return detect_kind(path) == kind
    holds.__doc__ = f"A {kind} package (manifest kind {kind!r}, or its form before package kinds)."
    return holds


_is_model_package = _package_of_kind("retrieval")  # hbi-export onnx, calibrate
_is_caption_package = _package_of_kind("caption")  # hbi-export caption-export
_is_qa_package = _package_of_kind("qa")  # hbi-export qa-export


def _is_checkpoint(path: Path) -> bool:
    """A checkpoint folder in the hbi-toolkit format (``hbi-export convert`` / ``init``)."""
    c = _json_object(path / "config.json")
    return (path / "model.safetensors").is_file() and c is not None and c.get("format") == "hbi-toolkit"


def _is_demo_folder(path: Path) -> bool:
    """A retrieval demo folder (``python -m hbi_training.demo``, ``hbi-export caption-joint-export``):
    ``README.txt`` beside a model package in ``package/``."""
    return (path / "README.txt").is_file() and _is_model_package(path / "package")


def _is_qa_demo_folder(path: Path) -> bool:
    """A QA demo folder (``hbi-train qa demo``): ``README.txt`` beside a QA package in ``package/``."""
    return (path / "README.txt").is_file() and _is_qa_package(path / "package")


def _is_explanation_folder(path: Path) -> bool:
    """An explanation folder (``hbi-run explain --out``): ``explain.json`` of schema ``hbi.explain/*``."""
    doc = _json_object(path / "explain.json")
    return doc is not None and str(doc.get("schema", "")).startswith("hbi.explain/")


def _is_triton_repository(path: Path) -> bool:
    """A Triton model repository (``hbi-export triton``): ``hbi_repository.json`` of schema
    ``hbi.triton-repository/*``."""
    doc = _json_object(path / "hbi_repository.json")
    return doc is not None and str(doc.get("schema", "")).startswith("hbi.triton-repository/")


ARTIFACT_KINDS: dict[str, Callable[[Path], bool]] = {
    "model package": _is_model_package,
    "caption package": _is_caption_package,
    "QA package": _is_qa_package,
    "checkpoint folder": _is_checkpoint,
    "demo artifact folder": _is_demo_folder,
    "QA demo folder": _is_qa_demo_folder,
    "explanation folder": _is_explanation_folder,
    "Triton model repository": _is_triton_repository,
}
"""What an existing folder must be for ``--overwrite`` to replace it, by the kind of artifact being written."""


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def prepare_output_dir(out: str | os.PathLike, *, kind: str, inputs: Iterable[str | os.PathLike | None] = (),
                       overwrite: bool = False, option: str = "--out") -> Path:
    """Check that ``out`` may receive a new artifact of ``kind`` (the rules above); nothing is written.

    Call it before the command's slow work, then write through :func:`staged_output_dir`.

    Args:
        out: the folder the command will write.
        kind: one of :data:`ARTIFACT_KINDS`: what an existing ``out`` must be for ``overwrite`` to replace it.
        inputs: every file or folder the command reads (``None`` entries are skipped).
        overwrite: the command's ``--overwrite``.
        option: how the command names ``out`` in messages (``--out``, ``--artifacts``, ``OUT`` ...).
    Returns:
        ``out`` as a Path.
    Raises:
        UsageError: ``out`` is, lies inside or contains an input; ``out`` (or the nearest existing folder above it)
            is not a folder; ``out`` is a non-empty folder that is not a ``kind`` (even with ``overwrite``) or that
            cannot be listed; ``out`` holds a ``kind`` and not ``overwrite``.
        ValueError: ``kind`` is unknown (a bug of the caller).
    """
    from hbi_runtime.errors import UsageError

    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; one of {sorted(ARTIFACT_KINDS)}")
    out = Path(out)
    shown = display_path(out)
    real_out = _real(out)
    new_hint = f"choose a new (or empty) {option} folder outside the command's inputs"
    for given in inputs:
        if given is None:
            continue
        real_in = _real(given)
        if real_out == real_in:
            why = "is"
        elif real_out.is_relative_to(real_in):
            why = "lies inside"
        elif real_in.is_relative_to(real_out):
            why = "contains"
        else:
            continue
        raise UsageError(f"{option} {shown} {why} the input {display_path(given)}; refusing to write there",
                         hint=new_hint)
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"{option} {shown} exists and is not a folder; refusing to replace it", hint=new_hint)
    above = out.absolute().parent
    while not os.path.lexists(above):
        above = above.parent
    if not above.is_dir():
        raise UsageError(f"{option} {shown}: {display_path(above)} is not a folder", hint=new_hint)
    if not out.is_dir():
        return out
    try:
        empty = next(os.scandir(out), None) is None
    except OSError as exc:
        raise UsageError(f"{option} {shown} cannot be listed ({exc.strerror}); refusing to replace it",
                         hint=new_hint) from None
    if empty:
        return out
    if not ARTIFACT_KINDS[kind](out):
        raise UsageError(f"{option} {shown} is a non-empty folder that does not hold a {kind}; refusing to replace "
                         f"it{' (even with --overwrite)' if overwrite else ''}",
                         hint=f"{new_hint}, or delete {shown} yourself if it should go")
    if not overwrite:
        raise UsageError(f"{option} {shown} already exists and holds a {kind}",
                         hint=f"pass --overwrite to replace it, or choose another {option}")
    return out


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A new empty folder beside ``out`` to write the artifact into; it replaces ``out`` (:func:`replace_dir`) when
    the block completes.

    When the block raises (or the swap fails), the temporary folder is deleted and ``out`` is as it was. Check
    ``out`` with :func:`prepare_output_dir` first: whatever ``out`` holds at the end is replaced. The folder gets
    plain ``mkdir`` permissions (not ``mkdtemp``'s ``0o700``): artifacts are shared.

    Raises:
        UsageError: the folder beside ``out`` cannot be created (no permission, read-only file system ...).
    """
    from hbi_runtime.errors import UsageError

    out = Path(os.path.abspath(out))  # "." or "pkg/..": a name to rename, and a parent to write beside it
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    except OSError as exc:
        raise UsageError(f"cannot create a folder in {display_path(out.parent)} ({exc.strerror}) to write "
                         f"{display_path(out)}", hint="choose an output folder in a writable place") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        replace_dir(tmp, out)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


