"""The video sides of a collection, stored contiguously per level: what the index keeps and scoring streams.

Per level (entity, action, event) a :class:`StoreLevel` holds

* ``tokens``  ``(N, T, D)`` in the storage dtype: ``float32``, ``float16``, or ``int8`` codes stored as
  ``uint8`` with zero point 128 (``code = round(x / scale) + 128``, codes 1..255; symmetric per token, so the
  zero point is only an offset that lets ONNX Runtime's u8 x s8 kernels read the array as it lies on disk);
* ``scales``  ``(N, T)`` float32, the per-token scale of the int8 format (``max|x| / 127``), absent otherwise;
* ``weights`` ``(N, T)`` float32, the softmaxed token weights;
* ``mask``    ``(N, T)`` bool, 1 = valid frame / token.

Invariant (established by every writer here, relied on by :mod:`hbi_runtime.scoring.engine`): padded positions
hold zero tokens (code 128, scale 0 for int8) and zero weights. A padded frame then yields ``S = 0`` from the
matrix product itself, which is exactly the official zero floor, and contributes nothing to the v2t sum.

On disk a store is a folder: ``store.json`` (schema, dtype, ``n``, per level its name, length and dim) and per
level ``<level>.tokens.npy``, ``<level>.weights.npy``, ``<level>.mask.npy`` (and ``<level>.scales.npy`` for
int8); :meth:`VideoStore.open` memory-maps them. The index grows a store in place with
:meth:`VideoStore.append_to`: rows are appended to each ``.npy`` (numpy pads ``.npy`` headers so that the
length of axis 0 can be rewritten in place), and ``store.json``, which holds the authoritative ``n``, is
replaced atomically last. An interrupted append leaves the old ``n`` in ``store.json``; the next open ignores the
extra rows and the next append truncates them first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.lib import format as npy_format

from hbi_runtime.errors import BadInputError, MismatchError, UsageError
from hbi_runtime.sides import LEVELS, Side, SideLevel

SCHEMA = "hbi.video_store/1"
HEADER_FILE = "store.json"
STORAGE_DTYPES = ("float32", "float16", "int8")
DEFAULT_DTYPE = "int8"  # fastest and smallest on the reference CPU; see docs in hbi_runtime/scoring/__init__.py
INT8_ZERO_POINT = 128
_NPY_HEADER_IO = {(1, 0): (npy_format.read_array_header_1_0, npy_format.write_array_header_1_0),
                  (2, 0): (npy_format.read_array_header_2_0, npy_format.write_array_header_2_0)}
_TOKEN_NUMPY = {"float32": np.float32, "float16": np.float16, "int8": np.uint8}


def _check_dtype(dtype: str) -> str:
    if dtype not in STORAGE_DTYPES:
        raise UsageError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    return dtype


def quantize_int8(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: ``(codes uint8 (..., D) with zero point 128, scales float32 (...))``.

    A zero token gets scale 0 and code 128 everywhere, so it dequantises to exactly 0.
    """
    x = np.asarray(tokens, dtype=np.float32)
    scales = np.abs(x).max(axis=-1) / np.float32(127)  # (...)
    safe = np.where(scales > 0, scales, np.float32(1))
    codes = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int16) + INT8_ZERO_POINT
    return codes.astype(np.uint8), scales.astype(np.float32)


def signed_codes(codes: np.ndarray) -> np.ndarray:
    """The int8 values of :func:`quantize_int8`'s codes (``code - 128``), as the int8 scorers' query operand."""
    return (codes.astype(np.int16) - INT8_ZERO_POINT).astype(np.int8)


@dataclass(frozen=True)
class StoreLevel:
    """One level of a :class:`VideoStore` (see the module docstring for the arrays and the invariant).

    Raises:
        BadInputError: shapes or dtypes that do not fit together.
    """

    dtype: str
    tokens: np.ndarray  # (N, T, D) float32 | float16 | uint8 codes
    weights: np.ndarray  # (N, T) float32, 0 at padding
    mask: np.ndarray  # (N, T) bool
    scales: np.ndarray | None = None  # (N, T) float32, int8 only

    def __post_init__(self) -> None:
        _check_dtype(self.dtype)
        if self.tokens.ndim != 3 or self.tokens.dtype != _TOKEN_NUMPY[self.dtype]:
            raise BadInputError(f"StoreLevel.tokens | Received {self.tokens.dtype} {self.tokens.shape}. Note: "
                                f"Expected (N, T, D) {np.dtype(_TOKEN_NUMPY[self.dtype])} for dtype {self.dtype}")
        rows = self.tokens.shape[:2]
        expected = [("weights", self.weights, np.float32), ("mask", self.mask, np.bool_)]
        if self.dtype == "int8":
            expected.append(("scales", self.scales, np.float32))
        elif self.scales is not None:
            raise BadInputError(f"StoreLevel.scales | Received scales for dtype {self.dtype}. Note: only int8 has them")
        for name, arr, dt in expected:
            if arr is None or arr.shape != rows or arr.dtype != dt:
                got = None if arr is None else (arr.dtype, arr.shape)
                raise BadInputError(f"StoreLevel.{name} | Received {got}. Note: Expected {np.dtype(dt)} {rows}")

    @property
    def n(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        """Tokens (frames) per video, ``T``."""
        return self.tokens.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by file stem (``tokens``, ``weights``, ``mask`` and, for int8, ``scales``)."""
        out = {"tokens": self.tokens, "weights": self.weights, "mask": self.mask}
        if self.scales is not None:
            out["scales"] = self.scales
        return out

    def take(self, ids: np.ndarray | slice) -> StoreLevel:
        """The videos ``ids`` (a slice stays a view of a memory map; an index array copies whole rows: ``np.take``
        copies each video's ``(T, D)`` block at once, where indexing copies it element by element, ~2x slower)."""
        if isinstance(ids, slice):
            pick = lambda a: a[ids]  # noqa: E731
        else:
            ids = np.asarray(ids)
            if ids.dtype == np.bool_:
                ids = np.flatnonzero(ids)
            pick = lambda a: np.take(a, ids, axis=0)  # noqa: E731
        scales = None if self.scales is None else pick(self.scales)
        return StoreLevel(self.dtype, pick(self.tokens), pick(self.weights), pick(self.mask), scales)

    def dequantize(self, ids: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Tokens of the videos ``ids`` as float32 ``(k, T, D)`` (zero at padding)."""
        tok = self.tokens[ids]
        if self.dtype != "int8":
            return tok.astype(np.float32)
        codes = tok.astype(np.float32) - np.float32(INT8_ZERO_POINT)
        return codes * self.scales[ids][..., None]

    @classmethod
    def from_side_level(cls, level: SideLevel, dtype: str) -> StoreLevel:
        """Canonicalise one video side level: zero tokens and weights at padding, convert to ``dtype``."""
        _check_dtype(dtype)
        mask = level.mask
        tokens = np.where(mask[..., None], level.tokens.astype(np.float32, copy=False), np.float32(0))
        weights = np.where(mask, level.weights.astype(np.float32, copy=False), np.float32(0))
        if not np.isfinite(tokens).all() or not np.isfinite(weights).all():
            raise BadInputError("video side | Received non-finite tokens or weights at valid positions. "
                                "Note: Expected finite, L2-normalised tokens")
        if dtype == "int8":
            codes, scales = quantize_int8(tokens)
            return cls(dtype, codes, weights, mask.copy(), scales)
        return cls(dtype, tokens.astype(_TOKEN_NUMPY[dtype]), weights, mask.copy())


def _concat_levels(levels: Sequence[StoreLevel]) -> StoreLevel:
    first = levels[0]
    key = (first.dtype, first.length, first.dim)
    for other in levels[1:]:
        if (other.dtype, other.length, other.dim) != key:
            raise MismatchError(f"cannot concatenate store levels of (dtype, T, D) {key} and "
                                f"{(other.dtype, other.length, other.dim)}")
    cat = {name: np.concatenate([lv.arrays()[name] for lv in levels]) for name in first.arrays()}
    return StoreLevel(first.dtype, cat["tokens"], cat["weights"], cat["mask"], cat.get("scales"))


@dataclass(frozen=True)
class VideoStore:
    """The video sides of ``n`` videos at the three levels, in one storage dtype.

    Attributes:
        levels: three :class:`StoreLevel` in the order of :data:`hbi_runtime.sides.LEVELS`, same ``n``.
        dtype: the storage dtype, one of :data:`STORAGE_DTYPES`.
    """

    levels: tuple[StoreLevel, StoreLevel, StoreLevel]
    dtype: str

    def __post_init__(self) -> None:
        _check_dtype(self.dtype)
        levels = tuple(self.levels)
        if len(levels) != len(LEVELS):
            raise BadInputError(f"VideoStore | Received {len(levels)} levels. Note: Expected {len(LEVELS)}")
        if {lv.n for lv in levels} != {levels[0].n} or any(lv.dtype != self.dtype for lv in levels):
            raise BadInputError("VideoStore | Received levels of different sizes or dtypes. Note: Expected the "
                                f"same n and dtype {self.dtype} at every level")
        object.__setattr__(self, "levels", levels)

    @property
    def n(self) -> int:
        return self.levels[0].n

    def __len__(self) -> int:
        return self.n

    def bytes_per_video(self) -> int:
        """Bytes the store holds per video, all levels and arrays together."""
        return sum(arr[:1].nbytes for lv in self.levels for arr in lv.arrays().values())

    @classmethod
    def from_sides(cls, side: Side, dtype: str = DEFAULT_DTYPE) -> VideoStore:
        """Store a video :class:`~hbi_runtime.sides.Side` (what the video encoder returns) in ``dtype``."""
        if not isinstance(side, Side) or side.kind != "video":
            raise UsageError("VideoStore.from_sides: expected a Side of kind 'video'")
        return cls(tuple(StoreLevel.from_side_level(lv, dtype) for lv in side.levels), dtype)

    @classmethod
    def concat(cls, stores: Sequence[VideoStore]) -> VideoStore:
        """One in-memory store holding ``stores`` one after the other (same dtype and shapes)."""
        if not stores:
            raise UsageError("VideoStore.concat needs at least one store")
        if len({s.dtype for s in stores}) != 1:
            raise MismatchError(f"cannot concatenate stores of dtypes {sorted({s.dtype for s in stores})}")
        levels = tuple(_concat_levels([s.levels[i] for s in stores]) for i in range(len(LEVELS)))
        return cls(levels, stores[0].dtype)

    def take(self, ids: np.ndarray | slice) -> VideoStore:
        """The videos ``ids``, as a store."""
        return VideoStore(tuple(lv.take(ids) for lv in self.levels), self.dtype)

    def header(self) -> dict:
        return {"schema": SCHEMA, "dtype": self.dtype, "n": self.n, "zero_point": INT8_ZERO_POINT,
                "levels": [{"name": name, "length": lv.length, "dim": lv.dim}
                           for name, lv in zip(LEVELS, self.levels)]}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the store as ``folder/store.json`` + one ``.npy`` per array (the folder is created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, lv in zip(LEVELS, self.levels):
            for stem, arr in lv.arrays().items():
                np.save(folder / f"{name}.{stem}.npy", np.ascontiguousarray(arr))
        _write_header(folder, self.header())
        return folder

    @classmethod
    def open(cls, folder: str | os.PathLike, *, mmap: bool = True) -> VideoStore:
        """Read a store written by :meth:`save` / :meth:`append_to`; memory-mapped read-only by default.

        Raises:
            BadInputError: the folder is not a store, or its files disagree with ``store.json``.
            MismatchError: the store has a schema this version does not know.
        """
        folder = Path(folder)
        header = _read_header(folder)
        dtype, n = header["dtype"], int(header["n"])
        levels = []
        for meta in header["levels"]:
            arrays = {}
            for stem in ("tokens", "weights", "mask") + (("scales",) if dtype == "int8" else ()):
                path = folder / f"{meta['name']}.{stem}.npy"
                try:
                    arr = np.load(path, mmap_mode="r" if mmap else None)
                except (OSError, ValueError) as exc:
                    raise BadInputError(f"video store {folder}: cannot read {path.name} ({exc})") from exc
                if arr.shape[0] < n:
                    raise BadInputError(f"video store {folder}: {path.name} holds {arr.shape[0]} rows, "
                                        f"store.json says {n}", hint="the store is damaged; re-index")
                arrays[stem] = arr[:n]
            level = StoreLevel(dtype, arrays["tokens"], arrays["weights"], arrays["mask"], arrays.get("scales"))
            if (level.length, level.dim) != (meta["length"], meta["dim"]):
                raise BadInputError(f"video store {folder}: level {meta['name']} has (T, D) "
                                    f"{(level.length, level.dim)}, store.json says {(meta['length'], meta['dim'])}")
            levels.append(level)
        return cls(tuple(levels), dtype)

    def append_to(self, folder: str | os.PathLike) -> int:
        """Append these videos to the store in ``folder`` in place (created if absent); returns the new ``n``.

        Rows beyond ``store.json``'s ``n`` (left by an interrupted append) are dropped first; ``store.json`` is
        replaced atomically after all rows are written.

        Raises:
            MismatchError: the stored dtype or level shapes differ from this store's.
        """
        folder = Path(folder)
        if not (folder / HEADER_FILE).exists():
            self.save(folder)
            return self.n
        header = _read_header(folder)
        mine = self.header()
        if header["dtype"] != self.dtype or header["levels"] != mine["levels"]:
            raise MismatchError(f"video store {folder} holds dtype {header['dtype']} levels {header['levels']}; "
                                f"cannot append dtype {self.dtype} levels {mine['levels']}")
        old_n = int(header["n"])
        for name, lv in zip(LEVELS, self.levels):
            for stem, arr in lv.arrays().items():
                _append_rows(folder / f"{name}.{stem}.npy", old_n, np.ascontiguousarray(arr))
        header["n"] = old_n + self.n
        _write_header(folder, header)
        return header["n"]


def _read_header(folder: Path) -> dict:
    try:
        header = json.loads((folder / HEADER_FILE).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise BadInputError(f"{folder} is not a video store: cannot read {HEADER_FILE} ({exc})") from exc
    if not isinstance(header, dict):
        raise BadInputError(f"{folder} is not a video store: {HEADER_FILE} is not an object")
    if header.get("schema") != SCHEMA:
        raise MismatchError(f"video store {folder} has schema {header.get('schema')!r}; this version reads {SCHEMA}",
                            hint="re-index with this version of hbi-toolkit")
    _check_dtype(header.get("dtype"))
    return header


def _write_header(folder: Path, header: dict) -> None:
    tmp = folder / (HEADER_FILE + ".tmp")
    tmp.write_text(json.dumps(header, indent=1))
    os.replace(tmp, folder / HEADER_FILE)


def _append_rows(path: Path, keep: int, rows: np.ndarray) -> None:
    """Truncate the ``.npy`` at ``path`` to ``keep`` rows, append ``rows``, rewrite the shape in its header."""
    with open(path, "r+b") as f:
        version = npy_format.read_magic(f)
        if version not in _NPY_HEADER_IO:
            raise MismatchError(f"{path}: .npy format version {version} cannot be appended to")
        read_header, write_header = _NPY_HEADER_IO[version]
        shape, fortran, dtype = read_header(f)
        data_start = f.tell()
        if fortran or dtype != rows.dtype or shape[1:] != rows.shape[1:] or shape[0] < keep:
            raise MismatchError(f"{path}: holds {dtype} {shape}, cannot append {rows.dtype} {rows.shape} after "
                                f"row {keep}")
        row_bytes = rows[:1].nbytes if rows.shape[0] else int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        f.truncate(data_start + keep * row_bytes)
        f.seek(0, os.SEEK_END)
        f.write(rows.tobytes())
        header = {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": (keep + rows.shape[0],) + tuple(shape[1:])}
        f.seek(0)
        before = data_start
        write_header(f, header)  # numpy pads the header so that axis 0 can grow in place
        if f.tell() != before:
            raise MismatchError(f"{path}: the grown .npy header no longer fits; rewrite the store with save()")
