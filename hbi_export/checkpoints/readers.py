"""Reading a checkpoint path into plain tensors, safely, and recognising which format it is.

Containers: torch.save pickles are read with ``torch.load(weights_only=True)`` (no arbitrary code), TorchScript
archives (OpenAI's ``ViT-B-32.pt``) with ``torch.jit.load``, safetensors with ``safetensors``. A directory, or a
``model.safetensors`` / ``pytorch_model.bin`` file, may carry a ``config.json`` beside it (ours or Hugging Face's).
Anything unreadable becomes a :class:`CheckpointError` with a hint, never a raw traceback.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hbi_export.checkpoints.report import UpcastKey, format_keys
from hbi_runtime.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the files a config.json directory may hold
WRAPPER_KEYS = ("state_dict", "model")  # training scripts often save {"state_dict": sd, "epoch": ...}
DDP_PREFIX = "module."
HALF_DTYPES = (torch.float16, torch.bfloat16)

# Formats (``detect_format``).
OFFICIAL = "official-hbi"
OPENAI = "openai-clip"
HF = "hf-clip"
NATIVE = "hbi-toolkit"

# What torch.load / torch.jit.load raise on files that are not (complete) checkpoints.
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
                KeyError, IndexError, ImportError, UnicodeDecodeError, zipfile.BadZipFile, OSError)


@dataclass
class RawCheckpoint:
    """A checkpoint as read from disk: flat name -> float tensor, plus its optional ``config.json``."""

    path: Path  # the weights file actually read
    tensors: dict[str, torch.Tensor]
    container: str  # "torch", "torchscript" or "safetensors"
    side_config: dict[str, Any] | None = None
    upcast: list[UpcastKey] = field(default_factory=list)


def _not_a_checkpoint(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a checkpoint: {why}",
        hint="pass an official HBI checkpoint (pytorch_model.bin.N / best.pth), OpenAI CLIP weights (ViT-B-32.pt), "
        "a Hugging Face CLIP directory, or a directory written by hbi-export",
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}", hint="the config.json must be valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, expected an object",
                              hint="the config.json must be a JSON object")
    return data


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with ``<name>/constants.pkl`` and ``<name>/code/``."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _is_safetensors(path: Path) -> bool:
    """An 8-byte little-endian header length, then a JSON header starting with ``{``."""
    with path.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # garbage bytes also fail as "Weights only load failed"
            raise _not_a_checkpoint(path, f"not a torch.save file (UnpicklingError: {_first_line(exc)})") from None
        raise CheckpointError(
            f"{path} holds Python objects other than tensors, which are not unpickled for safety "
            "(torch.load weights_only=True)",
            hint="re-save just the weights: torch.save(model.state_dict(), path)") from None
    except _LOAD_ERRORS as exc:
        raise _not_a_checkpoint(path, "not a torch.save file, TorchScript archive or safetensors file "
                                f"({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no details"


def _load_torchscript(path: Path) -> dict[str, torch.Tensor]:
    try:
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except _LOAD_ERRORS as exc:
        raise _not_a_checkpoint(path, f"cannot read the TorchScript archive: {type(exc).__name__}") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _not_a_checkpoint(path, f"cannot read safetensors: {exc}") from None


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a torch.save'd object: unwrap {"state_dict": ...}, strip ``module.``."""
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise _not_a_checkpoint(path, f"it holds {'an empty dict' if obj == {} else type(obj).__name__}, "
                                "not a state dict of tensors")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise _not_a_checkpoint(path, f"entries that are not named tensors: {format_keys(bad)}")
    if all(k.startswith(DDP_PREFIX) for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len(DDP_PREFIX):]: v for k, v in obj.items()}
    return dict(obj)


def _upcast(tensors: dict[str, torch.Tensor]) -> list[UpcastKey]:
    """fp16 / bf16 tensors -> fp32 in place; returns what was converted."""
    done = []
    for key, value in tensors.items():
        if value.dtype in HALF_DTYPES:
            done.append(UpcastKey(key, str(value.dtype).removeprefix("torch.")))
            tensors[key] = value.float()
    return done


def _resolve(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """(weights file, config.json content or None) for a file or directory argument."""
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        config_path = path / "config.json"
        files = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not files:
            raise CheckpointError(f"{path} is a directory without {' or '.join(WEIGHT_FILES)}",
                                  hint="pass the checkpoint file itself, or a directory written by "
                                  "`save_pretrained` / hbi-export")
        return files[0], (_read_json(config_path) if config_path.is_file() else None)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist", hint="check the path")
    config_path = path.parent / "config.json"
    if path.name in WEIGHT_FILES and config_path.is_file():
        return path, _read_json(config_path)
    return path, None


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Read a checkpoint file or directory into float32 tensors.

    Args:
        path: a weights file, a directory holding ``config.json`` + weights, or that ``config.json``.

    Returns:
        A :class:`RawCheckpoint`; half-precision tensors are upcast to float32 and listed in ``upcast``.

    Raises:
        CheckpointError: missing path, unreadable / truncated / empty file, or content that is not a state dict.
    """
    file, side_config = _resolve(Path(path))
    try:
        if file.stat().st_size == 0:
            raise _not_a_checkpoint(file, "the file is empty")
        if _is_safetensors(file):
            tensors, container = _load_safetensors(file), "safetensors"
        elif _is_torchscript(file):
            tensors, container = _load_torchscript(file), "torchscript"
        else:
            tensors, container = _unwrap(_load_torch(file), file), "torch"
    except (PermissionError, IsADirectoryError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror}", hint="check the file's permissions") from None
    raw = RawCheckpoint(path=file, tensors=tensors, container=container, side_config=side_config)
    raw.upcast = _upcast(raw.tensors)
    return raw


def detect_format(raw: RawCheckpoint) -> str:
    """Which checkpoint format ``raw`` is, from its config.json and its key names.

    Raises:
        CheckpointError: the keys belong to no supported format.
    """
    if raw.side_config is not None and raw.side_config.get("format") == NATIVE:
        return NATIVE
    keys = list(raw.tensors)
    if any(k.startswith("clip.") for k in keys):
        return OFFICIAL
    if any(k.startswith(("text_model.", "vision_model.")) for k in keys):
        return HF
    if any(k.startswith("visual.") for k in keys) and "token_embedding.weight" in raw.tensors:
        return OPENAI
    raise _not_a_checkpoint(raw.path, f"its {len(keys)} tensors match no known layout "
                            f"(first keys: {format_keys(keys, 5)})")
