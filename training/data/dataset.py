"""torch view of a generated synthetic set: (caption tokens, decoded frames) items and a one-caption-per-video sampler.

Items are (video, caption) pairs. The train split has several captions per video (canonical + paraphrases);
:class:`RandomCaptionSampler` draws one of them per video per epoch, so a batch never holds two captions of
one video (which a contrastive loss would count as negatives). The test split has one caption per video.

An item is ``(input_ids, text_mask, frames, frame_mask, video_id)``::

    input_ids   int64   (L,)          CLIP BPE ids, [SOT] words [EOT] 0...   (hbi_runtime.tokenizer.ClipTokenizer)
    text_mask   int64   (L,)          1 on SOT, words and EOT
    frames      float32 (T, 3, S, S)  decoded by hbi_runtime.video.decode_video (see hbi_training.data.cache)
    frame_mask  int64   (T,)
    video_id    str                   "train_00012"; its row is dataset.video_index[video_id]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hbi_runtime.errors import UsageError
from hbi_runtime.tokenizer import ClipTokenizer
from hbi_training.data.cache import frame_cache
from hbi_training.data.captions import MAX_WORDS
from hbi_training.data.manifest import Progress, read_manifest

CAPTION_MODES = ("all", "canonical")


class SyntheticVideoDataset(Dataset):
    """One split of a set written by :func:`hbi_training.data.synthetic.generate`.

    Decodes the split once (cached under ``root/cache``) and tokenises every caption up front.

    Args:
        root: the generated folder.
        split: ``train`` or ``test``.
        max_words: L, the text length (every caption of the grammar fits in the default).
        max_frames: T (>= the videos' seconds).
        image_size: S.
        captions: ``all`` (every caption: training) or ``canonical`` (the first caption only: retrieval
            queries); default ``all`` for train and ``canonical`` for test.
        progress: passed to the first-time decoding.

    Attributes:
        video_ids: ids in row order; ``video_index`` maps an id to its row.
        captions: per video, its captions (canonical first).
        pairs: int64 ``(P, 2)``: item ``k`` is caption ``pairs[k, 1]`` of video ``pairs[k, 0]``.

    Raises:
        UsageError: an unknown split or caption mode, a caption longer than ``max_words``, or ``max_frames``
            shorter than the videos. BadInputError / VideoDecodeError: see :func:`frame_cache`.
    """

    def __init__(self, root: str | os.PathLike, split: str, *, max_words: int = MAX_WORDS, max_frames: int = 8,
                 image_size: int = 32, captions: str | None = None, progress: Progress | None = None) -> None:
        mode = captions or ("all" if split == "train" else "canonical")
        if mode not in CAPTION_MODES:
            raise UsageError(f"captions must be one of {', '.join(CAPTION_MODES)}, got {captions!r}")
        root = Path(root)
        videos = [v for v in read_manifest(root)["videos"] if v["split"] == split]
        self.split = split
        self.video_ids = [v["id"] for v in videos]
        self.video_index = {vid: i for i, vid in enumerate(self.video_ids)}
        self.captions = [v["captions"] if mode == "all" else v["captions"][:1] for v in videos]
        self.pairs = np.array([(i, j) for i, caps in enumerate(self.captions) for j in range(len(caps))],
                              dtype=np.int64).reshape(-1, 2)
        self.input_ids, self.text_mask = _tokenize([c for caps in self.captions for c in caps], max_words)
        self.frames, self.frame_mask = frame_cache(root, split, max_frames=max_frames, image_size=image_size,
                                                   progress=progress)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
        video = int(self.pairs[k, 0])
        return (torch.from_numpy(self.input_ids[k]), torch.from_numpy(self.text_mask[k]),
                torch.from_numpy(np.array(self.frames[video])),  # a copy out of the read-only memory map
                torch.from_numpy(self.frame_mask[video]), self.video_ids[video])

    def items_of_video(self, video: int) -> np.ndarray:
        """The item indices of one video's captions."""
        return np.flatnonzero(self.pairs[:, 0] == video)


def _tokenize(texts: list[str], max_words: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask, truncated = ClipTokenizer(max_words=max_words)(texts)  # (P, L), (P, L)
    if any(truncated):
        longest = max((t for t, cut in zip(texts, truncated) if cut), key=len)
        raise UsageError(f"captions longer than max_words={max_words} tokens, e.g. {longest!r}",
                         hint=f"use max_words={MAX_WORDS} (fits every caption of the grammar)")
    return ids, mask


class RandomCaptionSampler(Sampler[int]):
    """Per epoch: every video once, in random order, each with one of its captions drawn at random.

    Deterministic from ``(seed, epoch)``; call :meth:`set_epoch` before each epoch (as with
    DistributedSampler), or the same draw repeats.
    """

    def __init__(self, dataset: SyntheticVideoDataset, *, seed: int = 0, shuffle: bool = True) -> None:
        self._starts = np.searchsorted(dataset.pairs[:, 0], np.arange(len(dataset.video_ids)))  # first item
        self._counts = np.bincount(dataset.pairs[:, 0], minlength=len(dataset.video_ids))
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        picks = self._starts + (rng.random(len(self._starts)) * self._counts).astype(np.int64)
        order = rng.permutation(len(picks)) if self.shuffle else np.arange(len(picks))
        return iter(int(i) for i in picks[order])
