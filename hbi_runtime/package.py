"""The model package: the contract between ``hbi-export onnx`` (which writes it) and hbi_runtime (which reads it).

A package is a directory::

    manifest.json                 this module's :class:`Manifest`, plus ``manifest_sha256``
    text_encoder.onnx             one ONNX file per graph (GRAPH_NAMES), each listed with its sha256
    video_encoder.onnx
    interaction.onnx
    *.onnx.data                   only where a graph keeps weights outside its file: each listed, with its sha256,
                                  in its graph's ``external_data``
    tokenizer/...                 the tokenizer files, each listed with its sha256
    engines/                      TensorRT engines with their own manifest (hbi_runtime.engines)

Integrity: every graph, external data and tokenizer file is listed with its sha256, and the manifest carries
``manifest_sha256``, the sha256 of its own canonical body (every field except that one, ``json.dumps`` with
``sort_keys=True``, ``separators=(",", ":")``, ``ensure_ascii=False``, UTF-8). Formatting changes do not matter;
any change of a value does. :func:`load_package` refuses a package that does not match its manifest (the files
are checked by :func:`hbi_runtime.package_files.check_package_files`, shared by every package kind: no symlink
leading out, no external data file a graph reads that the manifest does not list), a schema it does not know, and
(unless asked) a package whose export parity check failed or never ran. The only sanctioned way to change a written
manifest is :func:`update_status` (used by ``hbi-export parity``). What the hashes protect against, and what they
do not: docs/packages.md.

Validation lives in the ``from_dict`` constructors: every malformed field raises :class:`BadInputError` naming
its path (``graphs.text_encoder.opset: expected an integer, got 'x' (str)``); a value this runtime cannot serve
(unknown schema, other levels) raises :class:`MismatchError`. Unknown fields are refused: a new field is a new
schema version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping

from hbi_runtime import __version__
from hbi_runtime.errors import BadInputError, GateFailedError, MismatchError, UsageError
from hbi_runtime.fileio import write_atomic
# sha256_file lives with the file checks; hbi_runtime.package.sha256_file stays the name exporters import
from hbi_runtime.inputs import read_json
from hbi_runtime.package_files import check_package_files, onnx_external_files, sha256_file

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
HASH_FIELD = "manifest_sha256"
GRAPH_NAMES = ("text_encoder", "video_encoder", "interaction")
LEVELS = ("entity", "action", "event")
STATUSES = ("verified", "failed", "unverified")
PRECISIONS = ("fp32", "fp16", "int8")  # int8: explicit Q/DQ graphs written by ``hbi-export calibrate``
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CUSTOM_OP_RE = re.compile(r"[A-Za-z_][\w.]*\.[A-Za-z_]\w*")  # "domain.OpType", e.g. "hbi.TokenMerge"
_REQUIRED = object()

# ----------------------------------------------------------------------------------------------------------------
# Typed field access: each checker takes (value, path) and returns the normalised value or raises BadInputError.

Checker = Callable[[Any, str], Any]


def _wrong(path: str, expected: str, value: Any) -> BadInputError:
    return BadInputError(f"{path}: expected {expected}, got {value!r} ({type(value).__name__})")


def _checker(expected: str, ok: Callable[[Any], bool], convert: Callable[[Any], Any] = lambda v: v) -> Checker:
    def check(value: Any, path: str) -> Any:
        if not ok(value):
            raise _wrong(path, expected, value)
        return convert(value)
    return check


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_int = _checker("an integer", _is_int)
_pos_int = _checker("a positive integer", lambda v: _is_int(v) and v >= 1)
_float = _checker("a finite number", lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v), float)
_str = _checker("a non-empty string", lambda v: isinstance(v, str) and v != "")
_bool = _checker("true or false", lambda v: isinstance(v, bool))
_object = _checker("an object", lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v), dict)
_sha256 = _checker("a sha256 (64 lower-case hex digits)",
                   lambda v: isinstance(v, str) and _SHA256_RE.fullmatch(v) is not None)
_custom_op = _checker("a custom op 'domain.OpType'",
                      lambda v: isinstance(v, str) and _CUSTOM_OP_RE.fullmatch(v) is not None)


def _relpath(value: Any, path: str) -> str:
    """A file inside the package: relative, POSIX separators, no ``..`` (a manifest must not point outside)."""
    text = _str(value, path)
    parts = PurePosixPath(text).parts
    if "\\" in text or "\0" in text or text.startswith("/") or ".." in parts or not parts:
        raise _wrong(path, "a relative path inside the package (POSIX separators, no '..')", value)
    return text


def _iso_time(value: Any, path: str) -> str:
    try:
        dt.datetime.fromisoformat(_str(value, path))
    except ValueError:
        raise _wrong(path, "an ISO 8601 time", value) from None
    return value


def _axis(value: Any, path: str) -> int | str:
    return _str(value, path) if isinstance(value, str) else _pos_int(value, path)


def _one_of(choices: tuple) -> Checker:
    return _checker(f"one of {list(choices)}", lambda v: v in choices)


def _list_of(item: Checker, length: int | None = None) -> Checker:
    def check(value: Any, path: str) -> tuple:
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
            raise _wrong(path, f"a list of {length} items" if length is not None else "a list", value)
        return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))
    return check


def _dict_of(item: Checker) -> Checker:
    def check(value: Any, path: str) -> dict:
        return {k: item(v, f"{path}.{k}") for k, v in _object(value, path).items()}
    return check


def _optional(item: Checker) -> Checker:
    return lambda value, path: None if value is None else item(value, path)


class _Fields:
    """One JSON object read field by field; refuses unknown keys so that a typo never passes silently."""

    def __init__(self, data: Any, path: str, allowed: Iterable[str]) -> None:
        self.data = _object(data, path or "manifest")
        self.path = path
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            raise BadInputError(f"{path or 'manifest'}: unknown field(s) {unknown}; this schema (version "
                                f"{SCHEMA_VERSION}) has {sorted(allowed)}")

    def get(self, key: str, check: Checker, default: Any = _REQUIRED) -> Any:
        where = f"{self.path}.{key}" if self.path else key
        if key not in self.data:
            if default is _REQUIRED:
                raise BadInputError(f"{where}: required field is missing")
            return default
        return check(self.data[key], where)


def _freeze(obj: Any, **fields: Any) -> None:
    """Normalise sequence fields of a frozen dataclass to tuples (so that lists and tuples compare equal)."""
    for name, value in fields.items():
        object.__setattr__(obj, name, tuple(value))


def _check_schema(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInputError(f"{where}: no integer schema_version, so this is not a model package manifest",
                            hint="export a package with `hbi-export onnx --checkpoint CKPT --out PKG`")
    if value != SCHEMA_VERSION:
        newer = value > SCHEMA_VERSION
        raise MismatchError(
            f"{where}: manifest schema version {value} is unknown to hbi-toolkit {__version__}, which reads "
            f"schema version {SCHEMA_VERSION}",
            hint=("upgrade hbi-toolkit on this machine, or re-export the package with this toolkit version"
                  if newer else "re-export the package with this toolkit version: "
                                "`hbi-export onnx --checkpoint CKPT --out PKG`"))


# ----------------------------------------------------------------------------------------------------------------
# The manifest's parts


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``shape`` holds ints for static axes and names for dynamic ones."""

    name: str
    dtype: str  # one of DTYPES, numpy spelling ("float32")
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        _freeze(self, shape=self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Any, path: str = "tensor") -> TensorSpec:
        f = _Fields(data, path, ("name", "dtype", "shape"))
        return cls(name=f.get("name", _str), dtype=f.get("dtype", _one_of(DTYPES)),
                   shape=f.get("shape", _list_of(_axis)))


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the package: its file (relative to the package), hash, opset, precision and signature."""

    file: str
    sha256: str
    opset: int
    precision: str  # "fp32" | "fp16" | "int8"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    custom_ops: tuple[str, ...] = ()  # "hbi.TokenMerge", ...: what a runtime must provide (or inline)
    # the files ONNX Runtime reads the graph's external data from (relpath -> sha256, relative to the package like
    # ``file``); empty for a graph with all weights inline, and then absent from the manifest, so manifests written
    # before this field existed keep their hash
    external_data: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _freeze(self, inputs=self.inputs, outputs=self.outputs, custom_ops=self.custom_ops)
        object.__setattr__(self, "external_data", dict(self.external_data))

    def to_dict(self) -> dict:
        body = {"file": self.file, "sha256": self.sha256, "opset": self.opset, "precision": self.precision,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "custom_ops": list(self.custom_ops)}
        if self.external_data:
            body["external_data"] = dict(self.external_data)
        return body

    @classmethod
    def from_dict(cls, data: Any, path: str = "graph") -> GraphSpec:
        f = _Fields(data, path, ("file", "sha256", "opset", "precision", "inputs", "outputs", "custom_ops",
                                 "external_data"))
        tensors = _list_of(lambda v, p: TensorSpec.from_dict(v, p))
        external = f.get("external_data", _dict_of(_sha256), {})
        for rel in external:
            _relpath(rel, f"{path}.external_data (key)")
        return cls(file=f.get("file", _relpath), sha256=f.get("sha256", _sha256), opset=f.get("opset", _pos_int),
                   precision=f.get("precision", _one_of(PRECISIONS)), inputs=f.get("inputs", tensors),
                   outputs=f.get("outputs", tensors), custom_ops=f.get("custom_ops", _list_of(_custom_op), ()),
                   external_data=external)


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """How a video becomes the ``frames`` input: sampling, resize, crop and normalisation (travels with the model)."""

    max_frames: int
    frame_rate: float = 1.0  # frames per second before uniform down-sampling to max_frames
    sampling: str = "1fps-then-uniform"
    image_size: int
    resize: str = "shortest-side-bicubic"
    crop: str = "center"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        _freeze(self, mean=self.mean, std=self.std)

    def to_dict(self) -> dict:
        return {"max_frames": self.max_frames, "frame_rate": self.frame_rate, "sampling": self.sampling,
                "image_size": self.image_size, "resize": self.resize, "crop": self.crop,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Any, path: str = "preprocessing") -> Preprocessing:
        f = _Fields(data, path, ("max_frames", "frame_rate", "sampling", "image_size", "resize", "crop", "mean",
                                 "std"))
        rate = f.get("frame_rate", _float)
        if rate <= 0:
            raise _wrong(f"{path}.frame_rate", "a positive number", rate)
        return cls(max_frames=f.get("max_frames", _pos_int), frame_rate=rate, sampling=f.get("sampling", _str),
                   image_size=f.get("image_size", _pos_int), resize=f.get("resize", _str), crop=f.get("crop", _str),
                   mean=f.get("mean", _list_of(_float, 3)), std=f.get("std", _list_of(_float, 3)))


@dataclass(frozen=True, kw_only=True)
class TokenizerSpec:
    """The text contract: tokenizer kind, context length, special ids and the files (relative path -> sha256)."""

    kind: str = "clip-bpe"
    max_words: int  # context length L of input_ids
    sot_id: int = 49406
    eot_id: int = 49407
    pad_id: int = 0
    lowercase: bool = True
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "max_words": self.max_words, "sot_id": self.sot_id, "eot_id": self.eot_id,
                "pad_id": self.pad_id, "lowercase": self.lowercase, "files": dict(self.files)}

    @classmethod
    def from_dict(cls, data: Any, path: str = "tokenizer") -> TokenizerSpec:
        f = _Fields(data, path, ("kind", "max_words", "sot_id", "eot_id", "pad_id", "lowercase", "files"))
        files = f.get("files", _dict_of(_sha256))
        for rel in files:
            _relpath(rel, f"{path}.files (key)")
        return cls(kind=f.get("kind", _str), max_words=f.get("max_words", _pos_int), sot_id=f.get("sot_id", _int),
                   eot_id=f.get("eot_id", _int), pad_id=f.get("pad_id", _int),
                   lowercase=f.get("lowercase", _bool), files=files)


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _source(value: Any, path: str) -> dict:
    """Where the weights came from: ``checkpoint`` (path), ``format``, ``sha256`` (null for a folder); extras kept."""
    data = _object(value, path)
    for key, check in (("checkpoint", _str), ("format", _str), ("sha256", _optional(_sha256))):
        if key not in data:
            raise BadInputError(f"{path}.{key}: required field is missing")
        check(data[key], f"{path}.{key}")
    return data


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything a runtime needs to know about a package. ``model_config`` is opaque here (the HBIConfig dict).

    ``tokens_per_level`` gives the token count per level: ``{"text": [L, n1, n2], "video": [T, m1, m2]}``.
    ``parity`` is the export parity report (:meth:`hbi_runtime.compare.ParityResult.to_dict`) or None; ``status``
    says whether that check passed (``verified``), failed, or never ran (``unverified``).

    ``calibration`` is the report of ``hbi-export calibrate`` (an INT8 package, or the fp32 / fp16 fallback it
    wrote when the accuracy gate failed), else None. It is optional within schema version 1: a manifest without it
    has exactly the body (and ``manifest_sha256``) it had before the field existed. In a calibrated package
    ``status`` is ``verified`` only when its source package was verified *and* the calibration gate passed.
    """

    schema_version: int = SCHEMA_VERSION
    toolkit_version: str = __version__
    created: str = field(default_factory=_now_iso)  # ISO 8601, UTC
    model_config: dict
    levels: tuple[str, ...] = LEVELS
    level_weights: tuple[float, float, float]
    max_words: int
    max_frames: int
    embed_dim: int
    tokens_per_level: dict[str, tuple[int, ...]]
    preprocessing: Preprocessing
    tokenizer: TokenizerSpec
    graphs: dict[str, GraphSpec]
    parity: dict | None = None
    status: str = "unverified"
    source: dict
    calibration: dict | None = None

    def __post_init__(self) -> None:
        _freeze(self, levels=self.levels, level_weights=self.level_weights)
        object.__setattr__(self, "tokens_per_level", {k: tuple(v) for k, v in self.tokens_per_level.items()})

    def to_dict(self) -> dict:
        """The manifest body, JSON-ready (without ``manifest_sha256``, which :func:`write_manifest` adds)."""
        return {"schema_version": self.schema_version, "toolkit_version": self.toolkit_version,
                "created": self.created, "model_config": self.model_config, "levels": list(self.levels),
                "level_weights": list(self.level_weights), "max_words": self.max_words,
                "max_frames": self.max_frames, "embed_dim": self.embed_dim,
                "tokens_per_level": {k: list(v) for k, v in self.tokens_per_level.items()},
                "preprocessing": self.preprocessing.to_dict(), "tokenizer": self.tokenizer.to_dict(),
                "graphs": {k: g.to_dict() for k, g in self.graphs.items()}, "parity": self.parity,
                "status": self.status, "source": self.source,
                **({"calibration": self.calibration} if self.calibration is not None else {})}

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Validate a manifest body (a ``manifest_sha256`` key is accepted and ignored; load_package checks it).

        Raises:
            BadInputError: a field is missing, of the wrong type, unknown, or inconsistent with another.
            MismatchError: the schema version is unknown, or the levels are not LEVELS.
        """
        names = ("schema_version", "toolkit_version", "created", "model_config", "levels", "level_weights",
                 "max_words", "max_frames", "embed_dim", "tokens_per_level", "preprocessing", "tokenizer",
                 "graphs", "parity", "status", "source", "calibration", HASH_FIELD)
        f = _Fields(data, "", names)
        _check_schema(f.data.get("schema_version"), "schema_version")
        levels = f.get("levels", _list_of(_str))
        if levels != LEVELS:
            raise MismatchError(f"levels: {list(levels)} are not the levels this runtime scores, {list(LEVELS)}")
        manifest = cls(
            schema_version=SCHEMA_VERSION, toolkit_version=f.get("toolkit_version", _str),
            created=f.get("created", _iso_time), model_config=f.get("model_config", _object), levels=levels,
            level_weights=f.get("level_weights", _list_of(_float, len(LEVELS))),
            max_words=f.get("max_words", _pos_int), max_frames=f.get("max_frames", _pos_int),
            embed_dim=f.get("embed_dim", _pos_int), tokens_per_level=f.get("tokens_per_level", _tokens_per_level),
            preprocessing=f.get("preprocessing", Preprocessing.from_dict),
            tokenizer=f.get("tokenizer", TokenizerSpec.from_dict),
            graphs=f.get("graphs", _dict_of(GraphSpec.from_dict)), parity=f.get("parity", _optional(_object)),
            status=f.get("status", _one_of(STATUSES)), source=f.get("source", _source),
            calibration=f.get("calibration", _optional(_object), None))
        _check_consistency(manifest)
        return manifest

    @property
    def sha256(self) -> str:
        """The ``manifest_sha256`` this manifest is written with."""
        return manifest_sha256(self.to_dict())


def _tokens_per_level(value: Any, path: str) -> dict:
    f = _Fields(value, path, ("text", "video"))
    return {side: f.get(side, _list_of(_pos_int, len(LEVELS))) for side in ("text", "video")}


def _check_consistency(m: Manifest) -> None:
    """Fields that state the same fact twice must agree (a writer bug otherwise)."""
    pairs = (("tokens_per_level.text[0]", m.tokens_per_level["text"][0], "max_words", m.max_words),
             ("tokenizer.max_words", m.tokenizer.max_words, "max_words", m.max_words),
             ("tokens_per_level.video[0]", m.tokens_per_level["video"][0], "max_frames", m.max_frames),
             ("preprocessing.max_frames", m.preprocessing.max_frames, "max_frames", m.max_frames))
    for name, value, ref_name, ref in pairs:
        if value != ref:
            raise BadInputError(f"{name} = {value} disagrees with {ref_name} = {ref}")
    missing = [g for g in GRAPH_NAMES if g not in m.graphs]
    if missing:
        raise BadInputError(f"graphs: no entry for {missing}; a package has {list(GRAPH_NAMES)}")


# ----------------------------------------------------------------------------------------------------------------
# Hashes and writing


def manifest_sha256(body: Mapping[str, Any]) -> str:
    """sha256 of the canonical manifest body: every key except ``manifest_sha256``, sorted, compact, UTF-8."""
    canonical = {k: v for k, v in body.items() if k != HASH_FIELD}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_files(pkg_dir: str | os.PathLike, relpaths: Iterable[str]) -> dict[str, str]:
    """``{relpath: sha256}`` for files inside ``pkg_dir`` (relpaths in POSIX form, as the manifest stores them)."""
    root = Path(pkg_dir)
    return {rel: sha256_file(root / _relpath(rel, "relpath")) for rel in relpaths}


def write_manifest(pkg_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Validate ``manifest`` and write it, with its ``manifest_sha256``, to ``pkg_dir/manifest.json`` atomically.

    The manifest goes through :meth:`Manifest.from_dict` first, so a written manifest always loads. The file
    is written to a temporary file in the same folder and renamed over the old one (``os.replace``), so a
    reader never sees half a manifest.

    Returns:
        The path of the manifest.
    Raises:
        BadInputError, MismatchError: the manifest is invalid (a bug in the writer); nothing is written.
    """
    root = Path(pkg_dir)
    body = Manifest.from_dict(manifest.to_dict()).to_dict()
    body[HASH_FIELD] = manifest_sha256(body)
    text = json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    return write_atomic(root / MANIFEST_NAME, text)


# ----------------------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Package:
    """A loaded, checked model package. ``manifest_sha256`` identifies it in JSON outputs and indexes."""

    dir: Path
    manifest: Manifest
    manifest_sha256: str

    def graph(self, name: str) -> GraphSpec:
        """The spec of graph ``name``; MismatchError when the package has no such graph."""
        if name not in self.manifest.graphs:
            raise MismatchError(f"model package {self.dir} has no graph {name!r}; it has "
                                f"{sorted(self.manifest.graphs)}")
        return self.manifest.graphs[name]

    def graph_path(self, name: str) -> Path:
        """The ONNX file of graph ``name``."""
        return self.dir / self.graph(name).file

    def tokenizer_path(self, name: str) -> Path:
        """A tokenizer file by its manifest key (``tokenizer/bpe_simple_vocab_16e6.txt.gz``) or its file name."""
        files = self.manifest.tokenizer.files
        matches = [rel for rel in files if rel == name] or [rel for rel in files if PurePosixPath(rel).name == name]
        if len(matches) != 1:
            raise MismatchError(f"model package {self.dir} has {'several' if matches else 'no'} tokenizer file(s) "
                                f"named {name!r}; it has {sorted(files)}")
        return self.dir / matches[0]


def _export_hint(root: Path, checkpoint: str = "CKPT") -> str:
    return f"re-export the package: `hbi-export onnx --checkpoint {checkpoint} --out {root}`"


def _read_manifest(root: Path) -> tuple[Path, dict]:
    if not root.exists():
        raise BadInputError(f"model package {root} does not exist", hint=_export_hint(root))
    if not root.is_dir():
        raise BadInputError(f"model package {root} is not a directory (a package is a folder with "
                            f"{MANIFEST_NAME})", hint=_export_hint(root))
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BadInputError(f"{root} is not a model package: it has no {MANIFEST_NAME}", hint=_export_hint(root))
    raw = read_json(path, what="model package manifest", hint=_export_hint(root))
    if not isinstance(raw, dict):
        raise BadInputError(f"{path} is not a JSON object", hint=_export_hint(root))
    return path, raw


def _check_manifest_hash(path: Path, raw: dict, root: Path) -> str:
    stored = raw.get(HASH_FIELD)
    try:
        actual = manifest_sha256(raw)
    except ValueError:  # NaN / Infinity in the file: hbi-export never writes them
        actual = None
    if not isinstance(stored, str) or stored != actual:
        why = f"its {HASH_FIELD} is missing" if stored is None else f"its content no longer matches {HASH_FIELD}"
        raise MismatchError(
            f"{path} was edited after export ({why})",
            hint=f"{_export_hint(root, _checkpoint_of(raw.get('source')))}; change a package's status only with "
                 f"`hbi-export parity {root} --checkpoint {_checkpoint_of(raw.get('source'))}`, never by hand")
    return stored


def _checkpoint_of(source: Any) -> str:
    """The checkpoint path a manifest's ``source`` names, for hints (``CKPT`` when it names none)."""
    ckpt = source.get("checkpoint") if isinstance(source, Mapping) else None
    return ckpt if isinstance(ckpt, str) and ckpt else "CKPT"


def _check_status(root: Path, manifest: Manifest) -> None:
    ckpt = _checkpoint_of(manifest.source)
    hint = (f"re-check it with `hbi-export parity {root} --checkpoint {ckpt}`, or pass --allow-unverified to "
            f"use it anyway")
    if manifest.status == "failed":
        raise GateFailedError(f"model package {root} failed its parity check against the PyTorch model "
                              f"(status 'failed' in {MANIFEST_NAME}); refusing to load it", hint=hint)
    if manifest.status == "unverified":
        raise GateFailedError(f"model package {root} was never parity-checked (status 'unverified' in "
                              f"{MANIFEST_NAME}); refusing to load it", hint=hint)


def load_package(pkg_dir: str | os.PathLike, *, allow_unverified: bool = False,
                 verify_hashes: bool = True) -> Package:
    """Read and check a model package.

    Checks, in order: the folder and its manifest exist and parse (within the limits of
    :func:`~hbi_runtime.inputs.read_json`); the schema version is known; the manifest was not edited
    (``manifest_sha256``); every field is valid; the files pass
    :func:`~hbi_runtime.package_files.check_package_files` (no symlink leading out of the folder; every graph,
    external data and tokenizer file exists and, with ``verify_hashes``, has its listed sha256; every external data
    file a graph reads is listed); the status is ``verified`` (or ``allow_unverified``).

    Args:
        pkg_dir: the package folder.
        allow_unverified: accept status ``failed`` / ``unverified`` (a CLI's ``--allow-unverified``).
        verify_hashes: hash every file and read the graphs' external data references (streaming; skip only where
            the files were just checked).
    Returns:
        The :class:`Package`.
    Raises:
        BadInputError: no folder, no manifest, invalid / oversized / too deeply nested JSON, malformed field,
            missing file, a symlink leading out of the package, a graph that is not ONNX (exit 3).
        MismatchError: unknown schema, edited manifest, modified graph / external data / tokenizer file, external
            data the manifest does not list (exit 4).
        GateFailedError: status ``failed`` or ``unverified`` without ``allow_unverified`` (exit 5).
    """
    root = Path(pkg_dir)
    path, raw = _read_manifest(root)
    _check_schema(raw.get("schema_version"), str(path))
    digest = _check_manifest_hash(path, raw, root)
    try:
        manifest = Manifest.from_dict(raw)
    except (BadInputError, MismatchError) as exc:
        hint = exc.hint or _export_hint(root, _checkpoint_of(raw.get("source")))
        raise type(exc)(f"{path}: {exc.message}", hint=hint) from None
    check_package_files(root, manifest.tokenizer.files, graphs=manifest.graphs, verify_hashes=verify_hashes,
                        kind="model package", hint=_export_hint(root, _checkpoint_of(manifest.source)))
    if not allow_unverified:
        _check_status(root, manifest)
    return Package(dir=root, manifest=manifest, manifest_sha256=digest)


def update_status(pkg_dir: str | os.PathLike, status: str, parity_report: dict | None) -> Manifest:
    """Record a parity check's outcome in a package's manifest (the only sanctioned manifest edit).

    The package is loaded with every integrity check first (so a modified graph cannot be marked verified),
    then the manifest is rewritten atomically with the new status, report and ``manifest_sha256``.

    Returns:
        The new manifest.
    Raises:
        UsageError: ``status`` is not one of STATUSES.
        BadInputError, MismatchError: as :func:`load_package`.
    """
    if status not in STATUSES:
        raise UsageError(f"status {status!r} is not one of {list(STATUSES)}")
    package = load_package(pkg_dir, allow_unverified=True, verify_hashes=True)
    manifest = replace(package.manifest, status=status, parity=parity_report)
    write_manifest(pkg_dir, manifest)
    return manifest


def write_derived_package(source: Package, out: str | os.PathLike, *, graphs: Mapping[str, tuple[str | os.PathLike,
                                                                                                 str]],
                          status: str, calibration: dict | None = None, overwrite: bool = False) -> Package:
    """Write a copy of ``source`` at ``out`` with some graphs replaced (how ``hbi-export calibrate`` writes INT8).

    Every graph, external data and tokenizer file the source lists is copied (nothing else: engines built for other
    graphs stay behind); each graph named in ``graphs`` is replaced by the given ONNX file, with its new sha256 and
    precision, and the external data files it reads (found next to it, copied next to the graph's file).
    The package is written to a temporary sibling folder and renamed into place, so ``out`` is never half-written.

    Args:
        source: the loaded source package.
        out: the new package folder.
        graphs: ``{graph name: (onnx file, precision)}``; an ONNX file's external data ``location`` must be a
            relative path inside its folder.
        status: the new package's status (one of STATUSES).
        calibration: the manifest's ``calibration`` report.
        overwrite: replace an existing ``out``.
    Returns:
        The new package, loaded and hash-checked.
    Raises:
        UsageError: ``out`` exists (without ``overwrite``), is the source itself, or a graph name / precision /
            status is unknown.
        BadInputError: a replacement graph is not ONNX or reads external data from outside its folder.
    """
    import shutil

    from hbi_runtime.fileio import replace_dir

    out = Path(out)
    if out.resolve() == source.dir.resolve():
        raise UsageError(f"--out {out} is the source package itself", hint="write the new package to another folder")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists", hint="pass --overwrite or choose another --out")
    if status not in STATUSES:
        raise UsageError(f"status {status!r} is not one of {list(STATUSES)}")
    for name, (_, precision) in graphs.items():
        source.graph(name)
        if precision not in PRECISIONS:
            raise UsageError(f"precision {precision!r} of graph {name!r} is not one of {list(PRECISIONS)}")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        specs = {}

        def copy(src: str | os.PathLike, rel: str) -> str:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
            return sha256_file(tmp / rel)

        for name, spec in source.manifest.graphs.items():
            if name not in graphs:
                external = {rel: copy(source.dir / rel, rel) for rel in spec.external_data}
                specs[name] = replace(spec, sha256=copy(source.dir / spec.file, spec.file), external_data=external)
                continue
            file, precision = graphs[name]
            external = {}
            for location in onnx_external_files(file):
                rel = (PurePosixPath(spec.file).parent / _relpath(location, f"external data of {file}")).as_posix()
                if not (Path(file).parent / location).is_file():
                    raise BadInputError(f"{file} reads external data from {location!r}, which is not next to it")
                external[rel] = copy(Path(file).parent / location, rel)
            specs[name] = replace(spec, sha256=copy(file, spec.file), precision=precision, external_data=external)
        for rel in source.manifest.tokenizer.files:
            copy(source.dir / rel, rel)
        write_manifest(tmp, replace(source.manifest, graphs=specs, status=status, calibration=calibration,
                                    created=_now_iso(), toolkit_version=__version__))
        out.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, out)  # the old package is deleted only once the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_package(out, allow_unverified=True)
