"""Official HBI retrieval checkpoints (jpthu17/HBI ``main_retrieval.py``).

The official script saves ``torch.save(model.state_dict())`` of the unwrapped model, every epoch as
``<output_dir>/pytorch_model.bin.<epoch>`` and the best one as ``best.pth`` in the *working directory*. Its keys
are our layout plus the four training-only Banzhaf estimators (``banzhafmodel``, ``banzhafmodel0``,
``banzhafmodel1``, ``banzhafteacher``, each with an unused BatchNorm whose buffers are saved too). CLIP tensors
are fp16 when the model was trained on a GPU (``convert_weights``); the reader upcasts them.
"""

from __future__ import annotations

from hbi_export.checkpoints.base import Converted, LoadOptions
from hbi_export.checkpoints.layout import infer_hbi_config
from hbi_export.checkpoints.readers import RawCheckpoint
from hbi_export.checkpoints.report import TRAINING_ONLY, IgnoredKey
from hbi_runtime.errors import CheckpointError

TRAINING_ONLY_PREFIXES = ("banzhafmodel", "banzhafteacher")  # banzhafmodel0/1 share the first prefix
TRAINING_ONLY_REASON = "training-only Banzhaf estimator (unused at inference)"


def split_training_only(tensors: dict) -> tuple[dict, list[IgnoredKey]]:
    """Separate the Banzhaf estimator entries (parameters and BatchNorm buffers) from the rest."""
    kept, ignored = {}, []
    for key, value in tensors.items():
        if key.startswith(TRAINING_ONLY_PREFIXES):
            ignored.append(IgnoredKey(key, TRAINING_ONLY_REASON, TRAINING_ONLY, value.numel()))
        else:
            kept[key] = value
    return kept, ignored


def convert_official(raw: RawCheckpoint, options: LoadOptions) -> Converted:
    """Official HBI state dict -> our layout (identity after dropping the training-only keys).

    Raises:
        CheckpointError: architecture anchors missing, or text width != embed_dim (the official model builds
            its temporal transformer and heads at the text width, so such a file cannot come from it).
    """
    state_dict, ignored = split_training_only(raw.tensors)
    config = infer_hbi_config(state_dict, str(raw.path), **options.config_fields())
    if config.text.width != config.embed_dim:
        raise CheckpointError(
            f"{raw.path}: text width {config.text.width} != embed_dim {config.embed_dim}; the official HBI code "
            "builds its temporal transformer and weight heads at the text width, so this is not an official "
            "HBI checkpoint",
            hint="convert it to the hbi-toolkit format (config.json + model.safetensors) with an explicit config",
        )
    return Converted(state_dict, config, ignored)
