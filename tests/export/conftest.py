"""Checkpoint fixtures: a tiny HBI model, its official / OpenAI / Hugging Face renderings, model inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hbi_export.checkpoints import to_hf_clip_state_dict, to_openai_clip_state_dict
from hbi_export.model import HBIConfig, HBIModel
from hbi_export.model.config import TextConfig, VisionConfig

WIDTH = 128  # 2 heads under CLIP's width // 64 rule, so head splitting is exercised
BANZHAF_MODULES = ("banzhafmodel", "banzhafmodel0", "banzhafmodel1", "banzhafteacher")
HALF_KEYS = ("clip.visual.conv1.weight", "clip.visual.proj", "clip.text_projection",
             "clip.transformer.resblocks.0.attn.in_proj_weight", "clip.visual.transformer.resblocks.1.mlp.c_fc.bias")


def tiny_config(**overrides) -> HBIConfig:
    """Heads follow ``heads_for(width)`` (what inference from weights assumes); text width == embed_dim."""
    fields = dict(
        embed_dim=WIDTH,
        vision=VisionConfig(width=WIDTH, layers=2, heads=2, patch_size=16, image_size=32),
        text=TextConfig(width=WIDTH, layers=2, heads=2, context_length=16, vocab_size=500),
        temporal_layers=2, temporal_heads=2, frame_positions=16, merge_heads=2,
    )
    fields.update(overrides)
    return HBIConfig(**fields)


def banzhaf_entries(planes: int = 8) -> dict[str, torch.Tensor]:
    """The official training-only BanzhafModule tensors, BatchNorm buffers included (smaller planes)."""
    out = {}
    for name in BANZHAF_MODULES:
        shapes = {"cnn1.weight": (planes, 1, 3, 3), "cnn1.bias": (planes,), "bn.weight": (planes,),
                  "bn.bias": (planes,), "bn.running_mean": (planes,), "bn.running_var": (planes,),
                  "cnn2.weight": (1, planes, 3, 3), "cnn2.bias": (1,), "Q": (planes, planes),
                  "K": (planes, planes), "V": (planes, planes)}
        out.update({f"{name}.{k}": torch.randn(s) for k, s in shapes.items()})
        out[f"{name}.bn.num_batches_tracked"] = torch.tensor(7)
    return out


def make_model(config: HBIConfig, seed: int = 0) -> HBIModel:
    """A randomly initialised model with non-trivial LayerNorms and biases (so mapping bugs show)."""
    torch.manual_seed(seed)
    model = HBIModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "norm.weight", "norm1.weight")):
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def model_inputs(config: HBIConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.text.vocab_size, (3, 10), generator=gen)
    text_mask = torch.ones(3, 10)
    text_mask[1, 6:] = 0
    ids[1, 6:] = 0
    size = config.vision.image_size
    frames = torch.randn(2, 4, 3, size, size, generator=gen)
    frame_mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    frames[1, 2:] = 0
    return {"ids": ids, "text_mask": text_mask, "frames": frames, "frame_mask": frame_mask}


def official_state_dict(model: HBIModel) -> dict[str, torch.Tensor]:
    """What the official script would save: our keys, the Banzhaf modules, some CLIP tensors in fp16."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for key in HALF_KEYS:
        sd[key] = sd[key].half()
    sd.update(banzhaf_entries())
    return sd


class _ScriptRoot(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """A TorchScript archive whose ``state_dict()`` is ``state_dict`` (module tree built from the dotted keys)."""
    root = _ScriptRoot()
    for key, value in state_dict.items():
        *path_parts, leaf = key.split(".")
        module = root
        for name in path_parts:
            if name not in module._modules:
                module.add_module(name, nn.Module())
            module = module._modules[name]
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, value.clone())
    torch.jit.script(root).save(str(path))
    return path


def openai_jit_state_dict(model: HBIModel) -> dict[str, torch.Tensor]:
    """OpenAI's JIT state dict: CLIP keys plus the three metadata scalars."""
    cfg = model.config
    sd = to_openai_clip_state_dict(model.state_dict())
    sd["input_resolution"] = torch.tensor(cfg.vision.image_size)
    sd["context_length"] = torch.tensor(cfg.text.context_length)
    sd["vocab_size"] = torch.tensor(cfg.text.vocab_size)
    return sd


def hf_clip_config(config: HBIConfig, act: str = "quick_gelu"):
    from transformers import CLIPConfig

    v, t = config.vision, config.text
    return CLIPConfig(
        text_config=dict(hidden_size=t.width, intermediate_size=4 * t.width, num_hidden_layers=t.layers,
                         num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                         vocab_size=t.vocab_size, hidden_act=act, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
        vision_config=dict(hidden_size=v.width, intermediate_size=4 * v.width, num_hidden_layers=v.layers,
                           num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                           hidden_act=act),
        projection_dim=config.embed_dim,
    )


# Fixtures (importlib import mode: test files cannot import this module, so everything is a fixture).
@pytest.fixture(scope="session")
def ckpt_config() -> HBIConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def ckpt_model(ckpt_config) -> HBIModel:
    return make_model(ckpt_config)


@pytest.fixture(scope="session")
def ckpt_inputs(ckpt_config) -> dict[str, torch.Tensor]:
    return model_inputs(ckpt_config)


@pytest.fixture
def official_sd(ckpt_model) -> dict[str, torch.Tensor]:
    """A fresh official-format state dict (tests may modify it)."""
    return official_state_dict(ckpt_model)


@pytest.fixture(scope="session")
def official_file(ckpt_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("official") / "pytorch_model.bin.3"
    torch.save(official_state_dict(ckpt_model), path)
    return path


@pytest.fixture
def openai_sd(ckpt_model) -> dict[str, torch.Tensor]:
    """A fresh OpenAI-format state dict with the JIT metadata scalars."""
    return openai_jit_state_dict(ckpt_model)


@pytest.fixture(scope="session")
def openai_jit_file(ckpt_model, tmp_path_factory) -> Path:
    return save_torchscript(openai_jit_state_dict(ckpt_model), tmp_path_factory.mktemp("openai") / "ViT-T-16.pt")


@pytest.fixture(scope="session")
def hf_clip_dir(ckpt_model, tmp_path_factory) -> Path:
    """A real transformers CLIPModel holding the model's towers, written with save_pretrained."""
    from transformers import CLIPModel

    hf = CLIPModel(hf_clip_config(ckpt_model.config))
    hf.load_state_dict(to_hf_clip_state_dict(ckpt_model.state_dict()), strict=True)
    directory = tmp_path_factory.mktemp("hf") / "clip"
    hf.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def make_hf_config():
    """``hf_clip_config`` (a transformers CLIPConfig for an HBIConfig's towers)."""
    return hf_clip_config


@pytest.fixture(scope="session")
def to_torchscript():
    """``save_torchscript(state_dict, path)``."""
    return save_torchscript


@pytest.fixture(scope="session")
def tiny():
    """``tiny_config(**overrides)``."""
    return tiny_config


@pytest.fixture(scope="session")
def fresh_model():
    """``make_model(config, seed)``."""
    return make_model
