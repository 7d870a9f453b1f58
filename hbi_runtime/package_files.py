"""The files of a package on disk: the one integrity check every package loader runs, and its JSON reader.

Every package kind shares these rules (docs/packages.md): the one package reader,
:func:`hbi_runtime.package.read_package`, reads a manifest of any kind (retrieval, QA, caption, or a registered one;
new form or the forms before package kinds) with :func:`hbi_runtime.inputs.read_json` and hands the files it lists
(its ``graphs`` and ``files``) to :func:`check_package_files`, which refuses:

- a symlink anywhere in the package folder that leads outside it (a package is self-contained; a symlink that
  stays inside is followed, its target is what gets hashed);
- a listed path that is absolute, holds ``..`` / a backslash, or is not a regular file;
- a listed file whose sha256 differs from the manifest's;
- an ONNX graph that stores tensors in external data files (``TensorProto.external_data``, ``location``) the
  manifest does not list: ONNX Runtime reads those files next to the graph, so they are weights like any other
  and are hashed like any other. A graph's ``location`` must stay inside the package.

Files the manifest does not list and no graph reads (a README, ``engines/`` with its own manifest) are allowed.

The graphs are read with a small protobuf walk (:func:`onnx_external_files`), not the ``onnx`` package: a
deployment box may have onnxruntime without onnx, and the walk memory-maps the file and skips tensor bytes, so a
2 GB graph costs its structure, not its weights.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import posixpath
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from hbi_runtime.errors import BadInputError, MismatchError

_CHUNK_BYTES = 1 << 20
_SYMLINK_HINT = ("replace the symlink with a copy of what it points to: a package folder must be self-contained "
                 "(docs/packages.md)")


# ----------------------------------------------------------------------------------------------------------------
# Hashing and JSON


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks (graphs can be GBs).

    Raises:
        BadInputError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as exc:
        raise BadInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# ONNX external data: a minimal protobuf walk
#
# Every message of onnx.proto that can hold a TensorProto, and the fields that lead to one (field numbers from
# onnx/onnx.proto; protobuf never renumbers a field). Everything else is skipped by its wire type.

_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _FUNCTION, _TRAINING, _ENTRY = range(9)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},  # attribute
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},  # t g tensors graphs ...
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto (defaults)
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _TENSOR: {13: _ENTRY},  # external_data: StringStringEntryProto {key = 1, value = 2}
}


class _Truncated(Exception):
    pass


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Truncated("a truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _external_locations(buf: mmap.mmap | bytes) -> list[str]:
    """The ``location`` of every external-data entry of every tensor in a serialized ModelProto, in file order."""
    found: list[str] = []
    stack = [(0, len(buf), _MODEL)]
    while stack:
        pos, end, kind = stack.pop()
        children = _CHILDREN.get(kind, {})
        entry: dict[int, bytes] = {}
        while pos < end:
            tag = buf[pos]  # one-byte varints (most tags and short lengths) are read inline: the walk's hot path
            if tag < 0x80:
                pos += 1
            else:
                tag, pos = _varint(buf, pos, end)
            number, wire = tag >> 3, tag & 7
            if number == 0:
                raise _Truncated("field number 0")
            if wire == 0:
                if pos < end and buf[pos] < 0x80:
                    pos += 1
                else:
                    _, pos = _varint(buf, pos, end)
                continue
            if wire == 1 or wire == 5:
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                if pos < end and buf[pos] < 0x80:
                    length, pos = buf[pos], pos + 1
                else:
                    length, pos = _varint(buf, pos, end)
                start, pos = pos, pos + length
                if pos <= end and number in children:
                    stack.append((start, pos, children[number]))
                elif pos <= end and kind == _ENTRY and number in (1, 2):
                    entry[number] = bytes(buf[start:pos])
            else:  # 3 / 4: groups, which ONNX never uses; 6 / 7 do not exist
                raise _Truncated(f"wire type {wire}")
            if pos > end:
                raise _Truncated("a field runs past the end of its message")
        if kind == _ENTRY and entry.get(1) == b"location":
            found.append(entry.get(2, b"").decode("utf-8", errors="surrogateescape"))
    return found


def onnx_external_files(graph: str | os.PathLike) -> list[str]:
    """The external data files an ONNX model reads: each tensor's ``location``, as written, once, sorted.

    A location is relative to the folder of the graph file (how ONNX Runtime resolves it). The whole model is
    searched: initializers, sparse initializers, tensor attributes (``Constant``), subgraphs (``If``, ``Loop``,
    ``Scan``), local functions and training graphs.

    Raises:
        BadInputError: the file cannot be read or is not a serialized ONNX model.
    """
    path = Path(graph)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise BadInputError(f"{path} is empty, not an ONNX model")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                locations = _external_locations(buf)
    except OSError as exc:
        raise BadInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except _Truncated as exc:
        raise BadInputError(f"{path} is not an ONNX model (its protobuf is damaged: {exc})") from None
    return sorted(set(locations))


# ----------------------------------------------------------------------------------------------------------------
# The check


def _package_relpath(value: Any) -> str | None:
    """``value`` normalised if it is a relative POSIX path that stays inside its folder (no ``..``), else None."""
    if not isinstance(value, str) or not value or "\\" in value or "\0" in value or value.startswith("/"):
        return None
    parts = PurePosixPath(value).parts
    if not parts or ".." in parts:
        return None
    return posixpath.normpath(value)


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _check_symlinks(root: Path, root_real: str, kind: str) -> None:
    """Refuse every symlink under ``root`` whose target (resolved) is outside it; links are not walked into."""
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                listing = list(entries)
        except OSError as exc:
            raise BadInputError(f"cannot read {folder} in {kind} {root}: {exc.strerror or exc}") from None
        for entry in listing:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not _inside(target, root_real):
                    raise BadInputError(f"{entry.path} is a symlink to {target}, outside the {kind} {root}; "
                                        "refusing to follow it", hint=_SYMLINK_HINT)
            elif entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))


def check_package_files(root: str | os.PathLike, files: Mapping[str, str] | Iterable[tuple[str, str]] = (), *,
                        graphs: Mapping[str, Any] | None = None, verify_hashes: bool = True,
                        kind: str = "model package", hint: str | None = None) -> None:
    """Check that a package folder holds exactly what its manifest says (module docstring): the one check of every
    package loader.

    Args:
        root: the package folder.
        files: the non-graph files the manifest lists, ``relpath -> sha256`` (tokenizer files, ``answers.json``);
            relpaths are relative to ``root``, POSIX separators. Pairs are accepted too (the same file listed twice
            must carry the same hash).
        graphs: ``name -> GraphSpec`` (anything with ``file``, ``sha256`` and ``external_data``): each graph file
            and each of its listed external data files is checked like ``files``, and every external data file
            the graph reads must be listed (in any graph's ``external_data`` or in ``files``).
        verify_hashes: hash the files and read the graphs; False only checks that the files are there (for a
            caller that has just checked them).
        kind: the package kind, for messages ("QA package").
        hint: the next step for a package that does not match its manifest (re-export it).
    Raises:
        BadInputError: a listed file is missing, not a regular file or has a bad path; a symlink leads outside
            the package; a graph is not ONNX or reads external data from outside the package (exit 3).
        MismatchError: a file's sha256 differs from the manifest's; a graph reads an external data file the
            manifest does not list (exit 4).
    """
    root = Path(root)
    root_real = os.path.realpath(root)
    _check_symlinks(root, root_real, kind)
    expected: dict[str, str] = {}
    label: dict[str, str] = {}

    def listed(rel: Any, sha: Any, what: str) -> None:
        norm = _package_relpath(rel)
        if norm is None:
            raise BadInputError(f"{kind} {root}: the manifest lists {what} {rel!r}, which is not a relative path "
                                f"inside the package (POSIX separators, no '..')", hint=hint)
        if norm in expected and expected[norm] != sha:
            raise MismatchError(f"{kind} {root}: the manifest lists {norm} twice, with different sha256", hint=hint)
        expected[norm] = sha
        label.setdefault(norm, what)

    graph_files: dict[str, str] = {}
    for name, spec in (graphs or {}).items():
        listed(spec.file, spec.sha256, f"graph {name!r} file")
        graph_files[name] = posixpath.normpath(spec.file)
        for rel, sha in dict(getattr(spec, "external_data", None) or {}).items():
            listed(rel, sha, f"graph {name!r} external data file")
    for rel, sha in (files.items() if isinstance(files, Mapping) else files):
        listed(rel, sha, "file")
    for rel, sha in expected.items():
        path = root / rel
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise BadInputError(f"{kind} {root} is incomplete: {label[rel]} {path} is missing", hint=hint) from None
        except OSError as exc:
            raise BadInputError(f"cannot read {path}: {exc.strerror or exc}", hint=hint) from None
        if not _inside(os.path.realpath(path), root_real):  # the walk above refuses these first
            raise BadInputError(f"{path} leads outside the {kind} {root}; refusing to follow it", hint=_SYMLINK_HINT)
        if not stat.S_ISREG(info.st_mode):
            raise BadInputError(f"{kind} {root}: {label[rel]} {path} is not a regular file", hint=hint)
        if verify_hashes and (actual := sha256_file(path)) != sha:
            shown = f"{sha[:12]}..." if isinstance(sha, str) else repr(sha)
            raise MismatchError(f"{path} was modified after export: its sha256 is {actual[:12]}..., the manifest "
                                f"says {shown}", hint=hint)
    if not verify_hashes:
        return
    for name, rel in graph_files.items():
        try:
            locations = onnx_external_files(root / rel)
        except BadInputError as exc:
            raise BadInputError(f"{kind} {root}: graph {name!r}: {exc.message}", hint=exc.hint or hint) from None
        for location in locations:
            target = _package_relpath(location)
            if target is None:
                raise BadInputError(f"graph {name!r} ({root / rel}) reads external data from {location!r}, which is "
                                    f"not a relative path inside the {kind} {root}", hint=hint)
            target = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
            if target not in expected:
                raise MismatchError(
                    f"graph {name!r} ({root / rel}) reads its weights from the external data file {root / target}, "
                    f"which the manifest of {kind} {root} does not list, so nothing checks it", hint=hint)
