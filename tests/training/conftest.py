"""Fixtures of the training tests: a tiny HBI model and a tiny in-memory dataset of learnable pairs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from hbi_export.model import HBIConfig, HBIModel

L, T, S = 8, 4, 32  # text length, frames, frame size (HBIConfig.tiny: 32x32 frames, context 32)


class PairSet(Dataset):
    """``n`` fixed random (caption, video) pairs with varying valid lengths; item = the training 5-tuple."""

    def __init__(self, n: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 49000, (n, L), generator=g)
        lengths = torch.randint(3, L + 1, (n,), generator=g)
        self.tmask = (torch.arange(L)[None] < lengths[:, None]).long()
        self.ids = self.ids * self.tmask
        self.frames = torch.randn(n, T, 3, S, S, generator=g)
        nframes = torch.randint(2, T + 1, (n,), generator=g)
        self.fmask = (torch.arange(T)[None] < nframes[:, None]).long()
        self.frames = self.frames * self.fmask[:, :, None, None, None]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int):
        return self.ids[k], self.tmask[k], self.frames[k], self.fmask[k], f"video{k}"


@pytest.fixture
def pairs() -> PairSet:
    return PairSet()


@pytest.fixture
def make_pairs():
    return PairSet


def tiny_model(seed: int = 0) -> HBIModel:
    torch.manual_seed(seed)
    return HBIModel(HBIConfig.tiny())


@pytest.fixture
def make_model():
    return tiny_model
