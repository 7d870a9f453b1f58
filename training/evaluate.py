"""Validation: recall@1 of text-to-video and video-to-text retrieval with the model's sides and score."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from hbi_export.model.sides import Side, SideLevel


def concat_sides(sides: Sequence[Side]) -> Side:
    """Sides of consecutive batches (same padded lengths) as one side of the same type."""
    levels = tuple(SideLevel(*(torch.cat([getattr(s.levels[i], f) for s in sides]) for f in
                               ("tokens", "weights", "mask"))) for i in range(3))
    return type(sides[0])(levels)


@torch.no_grad()
def retrieval_recall(model, dataset: Dataset, *, batch_size: int = 64, device: torch.device | str = "cpu",
                     level_weights: tuple[float, float, float] | None = None) -> dict[str, float]:
    """R@1 over ``dataset`` (every caption a query; each distinct ``video_id`` encoded once).

    Returns ``{"t2v_r1", "v2t_r1", "texts", "videos"}``; a text is correct when its best video has its
    ``video_id``, a video when its best caption belongs to it. ``level_weights`` default to the model config's.
    Leaves the model in eval mode.
    """
    model.eval()
    text_sides, video_sides, text_vids = [], [], []
    index: dict[str, int] = {}  # video_id -> column
    for ids, tmask, frames, fmask, vids in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        vids = [str(v.item() if torch.is_tensor(v) else v) for v in vids]
        text_sides.append(model.encode_text(ids.to(device), tmask.to(device)))
        text_vids.extend(vids)
        new = []
        for k, v in enumerate(vids):
            if v not in index:
                index[v] = len(index)
                new.append(k)
        if new:
            keep = torch.tensor(new)
            video_sides.append(model.encode_video(frames[keep].to(device), fmask[keep].to(device)))
    scores = model.score(concat_sides(text_sides), concat_sides(video_sides), level_weights)  # (texts, videos)
    truth = torch.tensor([index[v] for v in text_vids], device=scores.device)
    t2v = (scores.argmax(dim=1) == truth).float().mean().item()
    best_text = scores.argmax(dim=0)  # (videos,)
    v2t = (truth[best_text] == torch.arange(len(index), device=scores.device)).float().mean().item()
    return {"t2v_r1": 100.0 * t2v, "v2t_r1": 100.0 * v2t, "texts": len(text_vids), "videos": len(index)}
