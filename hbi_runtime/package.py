"""The package format: one manifest base that every package kind extends, and the one reader of all of them.

A package is a folder holding ``manifest.json`` and the files it lists. Three kinds ship with the toolkit
(docs/packages.md); :func:`register_kind` adds another::

    kind        manifest class                                     load_any returns
    retrieval   Manifest (this module)                             hbi_runtime.model.Model
    qa          hbi_runtime.tasks.qa_package.QAManifest            hbi_runtime.tasks.qa.QAModelRuntime
    caption     hbi_runtime.tasks.caption.CaptionPackageManifest   hbi_runtime.tasks.caption.CaptionModel

Every manifest is a :class:`PackageManifest`: ``kind`` and ``schema_version``; ``toolkit_version`` and
``created``; ``graphs`` (each ONNX graph's file, sha256, signature and the external data files it reads, with their
sha256) and ``files`` (every other file the runtime reads, with its sha256); ``status`` and ``parity`` (the export's
parity verdict and report); ``source`` (where the weights came from). A kind adds only its own fields
(:func:`manifest_field`), and parts of those that name files (a tokenizer, an answer vocabulary) state them in
:meth:`PackageManifest.part_files` too, so that ``files`` lists everything and the two must agree.

:func:`read_package` is the one reader: it finds the manifest, reads it within the limits of
:func:`~hbi_runtime.inputs.read_json`, dispatches on ``kind``, and refuses an unknown kind or schema version, a
manifest whose own hash (``manifest_sha256``) no longer matches its body, a malformed field, a package that does not
match its manifest (:func:`hbi_runtime.package_files.check_package_files`: no symlink leading out of the folder,
every listed file present with its sha256, no external data a graph reads that the manifest does not list) and,
unless asked, a package whose export parity check failed or never ran. :func:`load_package` is that reader for
retrieval packages, :func:`load_any` opens a package of whatever kind it is.

A retrieval package (``hbi-export onnx``) is::

    manifest.json                 this module's :class:`Manifest`, plus ``manifest_sha256``
    text_encoder.onnx             one ONNX file per graph (GRAPH_NAMES), each listed with its sha256
    video_encoder.onnx
    interaction.onnx
    *.onnx.data                   only where a graph keeps weights outside its file: each listed, with its sha256,
                                  in its graph's ``external_data``
    tokenizer/...                 the tokenizer files, each listed with its sha256
    engines/                      TensorRT engines with their own manifest (hbi_runtime.engines)

Integrity: ``manifest_sha256`` is the sha256 of the manifest's own canonical body (every field except that one,
``json.dumps`` with ``sort_keys=True``, ``separators=(",", ":")``, ``ensure_ascii=False``, UTF-8). Formatting
changes do not matter; any change of a value does. The only sanctioned way to change a written manifest is
:func:`update_status` (used by ``hbi-export parity``). What the hashes protect against, and what they do not:
docs/packages.md.

Packages written before package kinds (schema version 1: a retrieval ``manifest.json`` without ``kind``, a QA
package's ``qa_manifest.json`` with ``kind: hbi-qa``, a caption ``manifest.json`` with ``schema:
hbi.caption-package``; :data:`LEGACY_FORMS`) are read as they are: their ``manifest_sha256`` is checked over the body
as written, with the same rule, and the body is then mapped onto its kind's class. Nothing rewrites them except
:func:`update_status`, which writes the current form.

Validation lives in the ``from_dict`` constructors: every malformed field raises :class:`BadInputError` naming
its path (``graphs.text_encoder.opset: expected an integer, got 'x' (str)``); a value this runtime cannot serve
(unknown kind or schema, other levels) raises :class:`MismatchError`. Unknown fields are refused: a new field is a
new schema version.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, ClassVar, Iterable, Mapping

from hbi_runtime.errors import BadInputError, GateFailedError, MismatchError, UsageError
from hbi_runtime.fileio import write_atomic
# sha256_file lives with the file checks; hbi_runtime.package.sha256_file stays the name exporters import
from hbi_runtime.inputs import read_json
from hbi_runtime.package_files import check_package_files, onnx_external_files, sha256_file
from hbi_runtime.version import __version__

FORMAT_VERSION = 2  # the one package format, every kind; 1 = the forms written before package kinds (LEGACY_FORMS)
LEGACY_SCHEMA_VERSION = 1
SCHEMA_VERSION = FORMAT_VERSION  # the retrieval manifest's schema version (the name exporters and tests import)
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


def _files(value: Any, path: str) -> dict[str, str]:
    """Files of the package with their hashes: ``{relative path: sha256}``."""
    files = _dict_of(_sha256)(value, path)
    for rel in files:
        _relpath(rel, f"{path} (key)")
    return files


class _Fields:
    """One JSON object read field by field; refuses unknown keys so that a typo never passes silently."""

    def __init__(self, data: Any, path: str, allowed: Iterable[str]) -> None:
        self.data = _object(data, path or "manifest")
        self.path = path
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            raise BadInputError(f"{path or 'manifest'}: unknown field(s) {unknown}; this schema has "
                                f"{sorted(allowed)}")

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
        external = f.get("external_data", _files, {})
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
        files = f.get("files", _files)
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


def _checkpoint_of(source: Any) -> str:
    """The checkpoint path a manifest's ``source`` names, for hints (``CKPT`` when it names none)."""
    ckpt = source.get("checkpoint") if isinstance(source, Mapping) else None
    return ckpt if isinstance(ckpt, str) and ckpt else "CKPT"


def _jsonable(value: Any) -> Any:
    """A manifest field as JSON: parts by their ``to_dict``, tuples as lists."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------------
# The base every package kind extends


@dataclass(frozen=True)
class Package:
    """A loaded, checked package of any kind (:func:`read_package`).

    ``manifest_sha256`` identifies it in JSON outputs and indexes: the hash its manifest was written with (also for
    a package of an older form, whose manifest is read as written). ``legacy`` says it was read from one of
    :data:`LEGACY_FORMS`.
    """

    dir: Path
    manifest: PackageManifest
    manifest_sha256: str
    legacy: bool = False

    @property
    def kind(self) -> str:
        return self.manifest.KIND

    @classmethod
    def opened(cls, root: Path, manifest: PackageManifest, digest: str, legacy: bool) -> Package:
        """The package of a checked manifest (a kind whose package reads more of its files overrides this)."""
        return cls(root, manifest, digest, legacy)

    def graph(self, name: str) -> GraphSpec:
        """The spec of graph ``name``; MismatchError when the package has no such graph."""
        if name not in self.manifest.graphs:
            raise MismatchError(f"{self.manifest.LABEL} {self.dir} has no graph {name!r}; it has "
                                f"{sorted(self.manifest.graphs)}")
        return self.manifest.graphs[name]

    def graph_path(self, name: str) -> Path:
        """The ONNX file of graph ``name``."""
        return self.dir / self.graph(name).file

    def tokenizer_path(self, name: str) -> Path:
        """A tokenizer file by its manifest key (``tokenizer/bpe_simple_vocab_16e6.txt.gz``) or its file name."""
        tokenizer = getattr(self.manifest, "tokenizer", None)
        files = tokenizer.files if tokenizer is not None else {}
        matches = [rel for rel in files if rel == name] or [rel for rel in files if PurePosixPath(rel).name == name]
        if len(matches) != 1:
            raise MismatchError(f"{self.manifest.LABEL} {self.dir} has {'several' if matches else 'no'} tokenizer "
                                f"file(s) named {name!r}; it has {sorted(files)}")
        return self.dir / matches[0]


def manifest_field(check: Checker, **default: Any) -> Any:
    """A field of a package kind's manifest: ``check(value, path)`` reads it from the file (returning the value or
    raising BadInputError naming ``path``); ``default=`` or ``default_factory=`` make it optional in the file."""
    return field(metadata={"check": check}, **default)


_BASE_FIELDS = ("kind", "schema_version", "toolkit_version", "created", "graphs", "files", "status", "parity",
                "source")
_NOT_IN_LEGACY = ("kind", "files")  # the base fields the forms before package kinds do not have


@dataclass(frozen=True, kw_only=True)
class PackageManifest:
    """What every package kind's manifest has; a kind subclasses it with its own fields (:func:`manifest_field`).

    ``graphs`` are the package's ONNX graphs (file, sha256, external data); ``files`` every other file the runtime
    reads, ``{relative path: sha256}``, including those the kind's parts name (:meth:`part_files`, added when not
    given). ``status`` says whether the export's parity check passed (``verified``), failed, or never ran
    (``unverified``); ``parity`` is its report. ``source`` says where the weights came from, or is None.

    Class attributes a kind sets: ``KIND`` (its name in the manifest and the registry), ``LABEL`` (how messages name
    it: "QA package"), ``GRAPHS`` (the graphs every package of the kind has), ``PACKAGE`` (the :class:`Package`
    class :func:`read_package` returns for it) and, when its fields change incompatibly, ``SCHEMA_VERSION``.
    """

    KIND: ClassVar[str] = ""
    LABEL: ClassVar[str] = "package"
    SCHEMA_VERSION: ClassVar[int] = FORMAT_VERSION
    GRAPHS: ClassVar[tuple[str, ...]] = ()
    PACKAGE: ClassVar[type[Package]] = Package

    toolkit_version: str = __version__
    created: str = field(default_factory=_now_iso)  # ISO 8601, UTC
    graphs: dict[str, GraphSpec]
    files: dict[str, str] = field(default_factory=dict)
    status: str = "unverified"
    parity: dict | None = None
    source: dict | None = None

    def __post_init__(self) -> None:
        for spec in self.own_fields():
            if isinstance(getattr(self, spec.name), list):
                object.__setattr__(self, spec.name, tuple(getattr(self, spec.name)))
        object.__setattr__(self, "graphs", dict(self.graphs))
        files = dict(self.files)
        for rel, sha in self.part_files():
            files.setdefault(rel, sha)
        object.__setattr__(self, "files", files)

    @property
    def kind(self) -> str:
        return self.KIND

    @property
    def schema_version(self) -> int:
        return self.SCHEMA_VERSION

    @classmethod
    def own_fields(cls) -> tuple[dataclasses.Field, ...]:
        """The kind's own fields (declared with :func:`manifest_field`)."""
        return tuple(f for f in dataclasses.fields(cls) if "check" in f.metadata)

    def part_files(self) -> Iterable[tuple[str, str]]:
        """The files (relative path, sha256) that the kind's own fields name; each must be in ``files``."""
        return ()

    def required_graphs(self) -> tuple[str, ...]:
        """The graphs this package must have."""
        return self.GRAPHS

    def check(self) -> None:
        """Refuse a manifest whose fields disagree (a writer bug otherwise); a kind adds its own rules.

        Raises:
            BadInputError: a required graph is missing, or ``files`` and a part disagree on a file's sha256.
        """
        missing = [g for g in self.required_graphs() if g not in self.graphs]
        if missing:
            raise BadInputError(f"graphs: no entry for {missing}; a {self.LABEL} has {list(self.required_graphs())}")
        for rel, sha in self.part_files():
            if self.files.get(rel) != sha:
                raise BadInputError(f"files.{rel} = {self.files.get(rel)} disagrees with the sha256 the {self.LABEL}'s "
                                    f"own fields list for it, {sha}")

    def to_dict(self) -> dict:
        """The manifest body, JSON-ready (without ``manifest_sha256``, which :func:`write_manifest` adds)."""
        body = {"kind": self.KIND, "schema_version": self.SCHEMA_VERSION, "toolkit_version": self.toolkit_version,
                "created": self.created, "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
                "files": dict(self.files), "status": self.status, "parity": _jsonable(self.parity),
                "source": _jsonable(self.source)}
        body.update({spec.name: _jsonable(getattr(self, spec.name)) for spec in self.own_fields()})
        return body

    @classmethod
    def from_dict(cls, data: Any, *, legacy: bool = False) -> PackageManifest:
        """Validate a manifest body (a ``manifest_sha256`` key is accepted and ignored; :func:`read_package` checks
        it). ``legacy``: a body of the form before package kinds (schema version 1, no ``kind`` and ``files``; its
        marker field already removed), mapped onto this class.

        Raises:
            BadInputError: a field is missing, of the wrong type, unknown, or inconsistent with another.
            MismatchError: another kind, an unknown schema version, or a value this runtime cannot serve.
        """
        own = cls.own_fields()
        base = [n for n in _BASE_FIELDS if not (legacy and n in _NOT_IN_LEGACY)]
        f = _Fields(data, "", (*base, *(spec.name for spec in own), HASH_FIELD))
        if not legacy:
            kind = f.get("kind", _str)
            if kind != cls.KIND:
                raise MismatchError(f"kind: {kind!r} is not a {cls.LABEL} ({cls.KIND!r})")
        _check_version(f.data.get("schema_version"), "schema_version", cls, legacy)
        values = {spec.name: f.get(spec.name, spec.metadata["check"]) for spec in own if spec.name in f.data
                  or (spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING)}
        manifest = cls(toolkit_version=f.get("toolkit_version", _str), created=f.get("created", _iso_time),
                       graphs=f.get("graphs", _dict_of(GraphSpec.from_dict)),
                       files={} if legacy else f.get("files", _files), status=f.get("status", _one_of(STATUSES)),
                       parity=f.get("parity", _optional(_object), None),
                       source=f.get("source", _optional(_source), None), **values)
        manifest.check()
        return manifest

    @property
    def sha256(self) -> str:
        """The ``manifest_sha256`` :func:`write_manifest` writes this manifest with (in the current form; a package
        read from an older form keeps the hash it was written with, :attr:`Package.manifest_sha256`)."""
        return manifest_sha256(self.to_dict())

    @classmethod
    def export_hint(cls, root: Path, source: Any = None) -> str:
        """How to make a new package of the kind at ``root`` (the hint of every refusal)."""
        return f"re-export the {cls.LABEL} with this hbi-toolkit version"

    @classmethod
    def edited_hint(cls, root: Path, source: Any = None) -> str:
        """The hint for a manifest edited by hand."""
        return cls.export_hint(root, source)

    @classmethod
    def status_hint(cls, root: Path, source: Any = None) -> str:
        """The hint for a package whose parity check failed or never ran."""
        return "re-export it (parity runs at export), or pass --allow-unverified to use it anyway"


def _check_version(value: Any, where: str, cls: type[PackageManifest], legacy: bool, root: Path | str = "PKG") -> None:
    """Refuse a schema version the kind's class does not read (``legacy``: the form before package kinds)."""
    if not _is_int(value):
        raise BadInputError(f"{where}: no integer schema_version, so this is not a {cls.LABEL} manifest",
                            hint=cls.export_hint(Path(root)))
    expected = LEGACY_SCHEMA_VERSION if legacy else cls.SCHEMA_VERSION
    if value != expected:
        old = any(form.kind == cls.KIND for form in LEGACY_FORMS)
        reads = f"schema version {cls.SCHEMA_VERSION}" + (
            f" (and {LEGACY_SCHEMA_VERSION} in the form before package kinds)" if old else "")
        raise MismatchError(
            f"{where}: {cls.LABEL} manifest schema version {value} is unknown to hbi-toolkit {__version__}, which "
            f"reads {reads}",
            hint=("upgrade hbi-toolkit on this machine, or re-export the package with this toolkit version"
                  if value > cls.SCHEMA_VERSION else cls.export_hint(Path(root))))


# ----------------------------------------------------------------------------------------------------------------
# The retrieval package's manifest


def _levels(value: Any, path: str) -> tuple[str, ...]:
    levels = _list_of(_str)(value, path)
    if levels != LEVELS:
        raise MismatchError(f"{path}: {list(levels)} are not the levels this runtime scores, {list(LEVELS)}")
    return levels


def _tokens_per_level(value: Any, path: str) -> dict:
    f = _Fields(value, path, ("text", "video"))
    return {side: f.get(side, _list_of(_pos_int, len(LEVELS))) for side in ("text", "video")}


def _export_hint(root: Path, checkpoint: str = "CKPT") -> str:
    return f"re-export the package: `hbi-export onnx --checkpoint {checkpoint} --out {root}`"


@dataclass(frozen=True, kw_only=True)
class Manifest(PackageManifest):
    """A retrieval package's manifest: everything a runtime needs to encode and score. ``model_config`` is opaque
    here (the HBIConfig dict).

    ``tokens_per_level`` gives the token count per level: ``{"text": [L, n1, n2], "video": [T, m1, m2]}``.
    ``parity`` is the export parity report (:meth:`hbi_runtime.compare.ParityResult.to_dict`) or None.

    ``calibration`` is the report of ``hbi-export calibrate`` (an INT8 package, or the fp32 / fp16 fallback it
    wrote when the accuracy gate failed), else None. In a calibrated package ``status`` is ``verified`` only when
    its source package was verified *and* the calibration gate passed.
    """

    KIND = "retrieval"
    LABEL = "model package"
    GRAPHS = GRAPH_NAMES

    model_config: dict = manifest_field(_object)
    levels: tuple[str, ...] = manifest_field(_levels, default=LEVELS)
    level_weights: tuple[float, float, float] = manifest_field(_list_of(_float, len(LEVELS)))
    max_words: int = manifest_field(_pos_int)
    max_frames: int = manifest_field(_pos_int)
    embed_dim: int = manifest_field(_pos_int)
    tokens_per_level: dict[str, tuple[int, ...]] = manifest_field(_tokens_per_level)
    preprocessing: Preprocessing = manifest_field(Preprocessing.from_dict)
    tokenizer: TokenizerSpec = manifest_field(TokenizerSpec.from_dict)
    calibration: dict | None = manifest_field(_optional(_object), default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "tokens_per_level", {k: tuple(v) for k, v in self.tokens_per_level.items()})

    def part_files(self) -> Iterable[tuple[str, str]]:
        return self.tokenizer.files.items()

    def check(self) -> None:
        """Fields that state the same fact twice must agree (a writer bug otherwise); ``source`` is required."""
        pairs = (("tokens_per_level.text[0]", self.tokens_per_level["text"][0], "max_words", self.max_words),
                 ("tokenizer.max_words", self.tokenizer.max_words, "max_words", self.max_words),
                 ("tokens_per_level.video[0]", self.tokens_per_level["video"][0], "max_frames", self.max_frames),
                 ("preprocessing.max_frames", self.preprocessing.max_frames, "max_frames", self.max_frames))
        for name, value, ref_name, ref in pairs:
            if value != ref:
                raise BadInputError(f"{name} = {value} disagrees with {ref_name} = {ref}")
        if self.source is None:
            raise BadInputError("source: required field is missing")
        super().check()

    @classmethod
    def export_hint(cls, root: Path, source: Any = None) -> str:
        return _export_hint(root, _checkpoint_of(source))

    @classmethod
    def edited_hint(cls, root: Path, source: Any = None) -> str:
        ckpt = _checkpoint_of(source)
        return (f"{_export_hint(root, ckpt)}; change a package's status only with `hbi-export parity {root} "
                f"--checkpoint {ckpt}`, never by hand")

    @classmethod
    def status_hint(cls, root: Path, source: Any = None) -> str:
        return (f"re-check it with `hbi-export parity {root} --checkpoint {_checkpoint_of(source)}`, or pass "
                f"--allow-unverified to use it anyway")


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


def write_manifest(pkg_dir: str | os.PathLike, manifest: PackageManifest) -> Path:
    """Validate ``manifest`` (any kind) and write it, with its ``manifest_sha256``, to ``pkg_dir/manifest.json``
    atomically, in the current form.

    The manifest goes through its class's ``from_dict`` first, so a written manifest always loads. The file is
    written to a temporary file in the same folder and renamed over the old one (``os.replace``), so a reader never
    sees half a manifest. A manifest of an older form under another name (``qa_manifest.json``) is removed after,
    so that the folder holds one manifest.

    Returns:
        The path of the manifest.
    Raises:
        BadInputError, MismatchError: the manifest is invalid (a bug in the writer); nothing is written.
    """
    root = Path(pkg_dir)
    body = type(manifest).from_dict(manifest.to_dict()).to_dict()
    body[HASH_FIELD] = manifest_sha256(body)
    text = json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    path = write_atomic(root / MANIFEST_NAME, text)
    for name in {form.file for form in LEGACY_FORMS} - {MANIFEST_NAME}:
        if (root / name).is_file():
            (root / name).unlink()
    return path


# ----------------------------------------------------------------------------------------------------------------
# The registry of package kinds


@dataclass(frozen=True)
class PackageKind:
    """A kind of package: its manifest class, and ``open``, which makes a checked :class:`Package` of the kind into
    what :func:`load_any` returns: ``open(package, *, allow_unverified=False, **options)``."""

    manifest: type[PackageManifest]
    open: Callable[..., Any] | str  # or "module:function", imported on first use (no import cycle at load time)

    @property
    def name(self) -> str:
        return self.manifest.KIND

    def opener(self) -> Callable[..., Any]:
        if callable(self.open):
            return self.open
        module, _, name = self.open.partition(":")
        return getattr(importlib.import_module(module), name)


_KINDS: dict[str, PackageKind] = {}
# the built-in kinds other than retrieval register when their module is imported, which happens on first use
_BUILTIN_KINDS = {"qa": "hbi_runtime.tasks.qa_package", "caption": "hbi_runtime.tasks.caption"}


def register_kind(manifest: type[PackageManifest], open: Callable[..., Any] | str) -> PackageKind:
    """Make packages of kind ``manifest.KIND`` readable (:func:`read_package`) and loadable (:func:`load_any`).

    Registering the same class again (or its module reloaded) replaces the entry.

    Raises:
        ValueError: the class has no ``KIND``, or another class holds that kind.
    """
    if not manifest.KIND:
        raise ValueError(f"{manifest.__qualname__} has no KIND")
    held = _KINDS.get(manifest.KIND)
    same = held is not None and (held.manifest.__module__, held.manifest.__qualname__) == (manifest.__module__,
                                                                                          manifest.__qualname__)
    if held is not None and not same:  # (the same class again, or its module reloaded: replaced)
        raise ValueError(f"package kind {manifest.KIND!r} is already {held.manifest.__qualname__}'s")
    _KINDS[manifest.KIND] = kind = PackageKind(manifest, open)
    return kind


def unregister_kind(name: str) -> None:
    """Forget a kind that :func:`register_kind` added (a plug-in's, a test's); built-in kinds come back on use."""
    _KINDS.pop(name, None)


def package_kind(name: str) -> PackageKind:
    """The registered kind ``name``.

    Raises:
        MismatchError: no such kind (a package of a newer toolkit, or a kind whose module is not imported).
    """
    if name not in _KINDS and name in _BUILTIN_KINDS:
        importlib.import_module(_BUILTIN_KINDS[name])
    if name not in _KINDS:
        raise MismatchError(f"package kind {name!r} is unknown to hbi-toolkit {__version__}, which reads "
                            f"{sorted({*_KINDS, *_BUILTIN_KINDS})}",
                            hint="upgrade hbi-toolkit on this machine, or re-export the package with this version")
    return _KINDS[name]


# ----------------------------------------------------------------------------------------------------------------
# Reading: the forms, the one reader, and loading


@dataclass(frozen=True)
class LegacyForm:
    """A manifest form written before package kinds (schema version 1), read as it is and mapped onto its kind.

    ``marker`` is the ``(field, value)`` that identifies it (dropped before the mapping); None identifies a
    ``manifest.json`` with neither ``kind`` nor ``schema`` (and no schema version of the current format).
    ``detect`` lists fields its manifest must also have for :func:`detect_kind` to count a folder as one.
    """

    file: str
    kind: str
    marker: tuple[str, str] | None = None
    detect: tuple[str, ...] = ()

    def matches(self, raw: Mapping[str, Any], name: str) -> bool:
        if name != self.file:
            return False
        if self.marker is not None:
            return raw.get(self.marker[0]) == self.marker[1]
        version = raw.get("schema_version")
        return "kind" not in raw and "schema" not in raw and not (_is_int(version) and version >= FORMAT_VERSION)

    def body(self, raw: Mapping[str, Any]) -> dict:
        """The body without its marker, as :meth:`PackageManifest.from_dict` reads it with ``legacy=True``."""
        return {k: v for k, v in raw.items() if self.marker is None or k != self.marker[0]}


LEGACY_FORMS = (
    LegacyForm(MANIFEST_NAME, "caption", ("schema", "hbi.caption-package")),
    LegacyForm("qa_manifest.json", "qa", ("kind", "hbi-qa")),
    LegacyForm(MANIFEST_NAME, "retrieval", detect=("schema_version", "graphs", "tokens_per_level")),
)
"""The forms of the three kinds before package kinds; every package they describe still loads."""

_ANY_HINT = "pass a package folder written by hbi-export onnx, hbi-export qa-export or hbi-export caption-export"


def _manifest_file(root: Path) -> Path | None:
    """The folder's manifest: ``manifest.json``, else a manifest of an older form, else None."""
    for name in (MANIFEST_NAME, *(form.file for form in LEGACY_FORMS)):
        if (root / name).is_file():
            return root / name
    return None


def _identify(raw: Mapping[str, Any], path: Path, hint: str) -> tuple[type[PackageManifest], LegacyForm | None]:
    """The manifest class a body is read with, and the older form it is in (None: the current form)."""
    for form in LEGACY_FORMS:
        if form.matches(raw, path.name):
            return package_kind(form.kind).manifest, form
    kind = raw.get("kind")
    if path.name != MANIFEST_NAME or not isinstance(kind, str) or not kind:
        raise BadInputError(f"{path}: kind: required field is missing, so this is not a package manifest", hint=hint)
    return package_kind(kind).manifest, None


def detect_kind(pkg_dir: str | os.PathLike) -> str | None:
    """The kind of package a folder holds, judged by its manifest's form alone, or None (no package manifest).

    Nothing is checked beyond the form (a damaged package is still the kind it was); what ``--overwrite`` may
    replace is decided with this (:data:`hbi_runtime.outputs.ARTIFACT_KINDS`).
    """
    path = _manifest_file(Path(pkg_dir))
    if path is None:
        return None
    try:
        raw = read_json(path)
    except BadInputError:
        return None
    if not isinstance(raw, dict) or HASH_FIELD not in raw:
        return None
    for form in LEGACY_FORMS:
        if form.matches(raw, path.name):
            return form.kind if all(key in raw for key in form.detect) else None
    kind = raw.get("kind")
    ok = path.name == MANIFEST_NAME and isinstance(kind, str) and kind and {"schema_version", "graphs"} <= set(raw)
    return kind if ok else None


def _check_status(root: Path, name: str, manifest: PackageManifest) -> None:
    if manifest.status == "verified":
        return
    what = ("failed its parity check against the PyTorch model" if manifest.status == "failed"
            else "was never parity-checked")
    raise GateFailedError(f"{manifest.LABEL} {root} {what} (status {manifest.status!r} in {name}); refusing to load "
                          f"it", hint=manifest.status_hint(root, manifest.source))


def read_package(pkg_dir: str | os.PathLike, *, kind: str | None = None, allow_unverified: bool = False,
                 verify_hashes: bool = True) -> Package:
    """Read and check a package: the one reader of every kind and form.

    Checks, in order: the folder and its manifest exist and parse (within the limits of
    :func:`~hbi_runtime.inputs.read_json`); its kind is known (and is ``kind``, when given); its schema version is
    known; the manifest was not edited (``manifest_sha256``, over the body as written); every field is valid; the
    files pass :func:`~hbi_runtime.package_files.check_package_files` (no symlink leading out of the folder; every
    graph, external data and listed file exists and, with ``verify_hashes``, has its listed sha256; every external
    data file a graph reads is listed); the status is ``verified`` (or ``allow_unverified``); and whatever the
    kind's :meth:`Package.opened` reads (a QA package's answer vocabulary).

    Args:
        pkg_dir: the package folder.
        kind: the kind the caller needs (``"retrieval"``, ``"qa"``, ``"caption"``); None: any.
        allow_unverified: accept status ``failed`` / ``unverified`` (a CLI's ``--allow-unverified``).
        verify_hashes: hash every file and read the graphs' external data references (streaming; skip only where
            the files were just checked).
    Returns:
        The kind's :class:`Package` (``manifest`` of the kind's class).
    Raises:
        BadInputError: no folder, no manifest, invalid / oversized / too deeply nested JSON, malformed field,
            missing file, a symlink leading out of the package, a graph that is not ONNX (exit 3).
        MismatchError: unknown kind or schema, another kind than ``kind``, edited manifest, modified graph /
            external data / listed file, external data the manifest does not list (exit 4).
        GateFailedError: status ``failed`` or ``unverified`` without ``allow_unverified`` (exit 5).
    """
    root = Path(pkg_dir)
    wanted = package_kind(kind).manifest if kind is not None else None
    label = wanted.LABEL if wanted else "package"
    hint = wanted.export_hint(root) if wanted else _ANY_HINT
    if not root.exists():
        raise BadInputError(f"{label} {root} does not exist", hint=hint)
    if not root.is_dir():
        raise BadInputError(f"{label} {root} is not a directory (a package is a folder with {MANIFEST_NAME})",
                            hint=hint)
    path = _manifest_file(root)
    if path is None:
        raise BadInputError(f"{root} is not a {label}: it has no {MANIFEST_NAME}", hint=hint)
    raw = read_json(path, what=f"{label} manifest", hint=hint)
    if not isinstance(raw, dict):
        raise BadInputError(f"{path} is not a JSON object, so not a {label} manifest", hint=hint)
    cls, form = _identify(raw, path, hint)
    if wanted is not None and cls is not wanted:
        raise MismatchError(f"{root} holds a {cls.LABEL} (kind {cls.KIND!r}), not a {wanted.LABEL}",
                            hint=f"pass a {wanted.LABEL} folder")
    body = form.body(raw) if form else raw
    source = raw.get("source")
    _check_version(body.get("schema_version"), str(path), cls, form is not None, root)
    digest = raw.get(HASH_FIELD)
    try:
        actual = manifest_sha256(raw)
    except ValueError:  # NaN / Infinity in the body: read_json refuses them first
        actual = None
    if not isinstance(digest, str) or digest != actual:
        why = f"its {HASH_FIELD} is missing" if digest is None else f"its content no longer matches {HASH_FIELD}"
        raise MismatchError(f"{path} was edited after export ({why})", hint=cls.edited_hint(root, source))
    try:
        manifest = cls.from_dict(body, legacy=form is not None)
    except (BadInputError, MismatchError) as exc:
        raise type(exc)(f"{path}: {exc.message}", hint=exc.hint or cls.export_hint(root, source)) from None
    check_package_files(root, manifest.files, graphs=manifest.graphs, verify_hashes=verify_hashes, kind=cls.LABEL,
                        hint=cls.export_hint(root, manifest.source))
    if not allow_unverified:
        _check_status(root, path.name, manifest)
    return cls.PACKAGE.opened(root, manifest, digest, form is not None)


def load_package(pkg_dir: str | os.PathLike, *, allow_unverified: bool = False,
                 verify_hashes: bool = True) -> Package:
    """Read and check a retrieval model package: :func:`read_package` with ``kind="retrieval"`` (its checks and
    errors)."""
    return read_package(pkg_dir, kind="retrieval", allow_unverified=allow_unverified, verify_hashes=verify_hashes)


def load_any(pkg_dir: str | os.PathLike, *, allow_unverified: bool = False, **options: Any) -> Any:
    """Open a package of whatever kind it is: :func:`read_package`, then the kind's ``open`` with ``options``.

    Returns what the kind's loader returns: a retrieval package a :class:`hbi_runtime.model.Model`
    (``hbi_runtime.load``), a QA package a :class:`hbi_runtime.tasks.qa.QAModelRuntime`, a caption package a
    :class:`hbi_runtime.tasks.caption.CaptionModel` (with its retrieval package), a registered kind what its
    ``open`` makes.

    Raises:
        as :func:`read_package`; UsageError for options the kind's loader does not take.
    """
    package = read_package(pkg_dir, allow_unverified=allow_unverified)
    return package_kind(package.kind).opener()(package, allow_unverified=allow_unverified, **options)


def update_status(pkg_dir: str | os.PathLike, status: str, parity_report: dict | None, *,
                  kind: str | None = "retrieval") -> PackageManifest:
    """Record a parity check's outcome in a package's manifest (the only sanctioned manifest edit).

    The package is read with every integrity check first (so a modified graph cannot be marked verified), then
    the manifest is rewritten atomically, in the current form, with the new status, report and
    ``manifest_sha256``.

    Args:
        kind: the kind the package must be (None: any).
    Returns:
        The new manifest.
    Raises:
        UsageError: ``status`` is not one of STATUSES.
        BadInputError, MismatchError: as :func:`read_package`.
    """
    if status not in STATUSES:
        raise UsageError(f"status {status!r} is not one of {list(STATUSES)}")
    package = read_package(pkg_dir, kind=kind, allow_unverified=True, verify_hashes=True)
    manifest = replace(package.manifest, status=status, parity=parity_report)
    write_manifest(pkg_dir, manifest)
    return manifest


register_kind(Manifest, "hbi_runtime.model:open_model")


def write_derived_package(source: Package, out: str | os.PathLike, *, graphs: Mapping[str, tuple[str | os.PathLike,
                                                                                                 str]],
                          status: str, calibration: dict | None = None, overwrite: bool = False) -> Package:
    """Write a copy of ``source`` at ``out`` with some graphs replaced (how ``hbi-export calibrate`` writes INT8).

    Every graph, external data and other file the source lists is copied (nothing else: engines built for other
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
        for rel in source.manifest.files:
            copy(source.dir / rel, rel)
        write_manifest(tmp, replace(source.manifest, graphs=specs, status=status, calibration=calibration,
                                    created=_now_iso(), toolkit_version=__version__))
        out.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, out)  # the old package is deleted only once the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_package(out, allow_unverified=True)
