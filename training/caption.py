"""Train the caption / open-ended QA decoder on the synthetic set, on the retrieval model's frozen video encoder.

::

    hbi-train caption --data DIR --out RUN [--model hbi_runtime/data/demo/package] [--steps 4000]

1. The video side of every synthetic video is computed **once** through the retrieval package's own
   ``video_encoder.onnx`` (``hbi_runtime.load(pkg).encode_frames`` on the frame caches of
   ``hbi_training.data.frame_cache``) and cached as ``.npz`` beside the run: the encoder stays frozen, and
   training touches only the small decoder, so it takes minutes on a shared 2-core CPU.
2. Targets: the canonical caption of each train video (``--captions all`` adds the grammar's paraphrases) and
   open-ended QA pairs from its scene metadata (:func:`qa_pairs`), tokenised with the CLIP tokenizer.
3. Teacher forcing, cross entropy on the tokens after the prefix (``[SOT]`` for captions, ``[SOT] question``
   for QA); AdamW with warmup + cosine; seeded.
4. The decoder folder (``decoder.safetensors`` + ``decoder.json``) and ``metrics.jsonl``; the held-out
   attribute accuracy (:func:`attribute_match`) of greedy captions is measured at the end (PyTorch greedy).

:func:`attribute_match` is the goal's checker: a caption names every attribute of a scene when the clauses it
contains, in order, give exactly the scene's events: colour, shape, action (direction for moves, the new colour
for turns), and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from hbi_runtime.errors import BadInputError, UsageError
from hbi_runtime.tokenizer import EOT_ID, SOT_ID, ClipTokenizer

SIDE_NAMES = tuple(f"video_{part}_{tag}" for tag in ("l0", "l1", "l2") for part in ("tokens", "weights", "mask"))
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class CaptionTrainSettings:
    data_dir: Path
    out_dir: Path
    package: Path  # the retrieval package whose video encoder is frozen
    steps: int = 4000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    seed: int = 0
    captions: str = "canonical"  # or "all" (paraphrases too)
    qa: bool = True  # also train open-ended QA
    qa_fraction: float = 0.3  # share of QA rows in a batch (the rest: captions)
    width: int = 128
    layers: int = 2
    heads: int = 4
    levels: tuple[int, ...] = (0, 1, 2)
    dropout: float = 0.1
    threads: int = 1
    log_every: int = 100
    init_decoder: Path | None = None  # continue this decoder (same vocabulary and memory shape) instead of a new one
    token_dropout: float = 0.0  # caption / answer input words replaced by "unknown" with this probability
    frame_deltas: bool = False  # DecoderConfig.frame_deltas: consecutive-frame difference tokens in the memory
    patch_grid: int = 0  # DecoderConfig.patch_grid: > 0 adds the spatial memory (needs ``checkpoint``)
    checkpoint: Path | None = None  # the retrieval checkpoint ``package`` was exported from (its patch tokens)
    # (folder, name): ``package`` / ``checkpoint`` lie in a folder being built that is renamed to ``name`` when
    # complete (hbi_training.joint's decoder stage); summary.json and the decoder record them under ``name``
    recorded_as: tuple[Path, Path] | None = None


# ---------------------------------------------------------------------------------------------------------------
# attributes: the goal's checker, from the scene metadata

_VERB = r"(?:moves|slides|appears|shows up|disappears|vanishes|turns|becomes|changes to)"


def _clause_re(colours: Iterable[str], shapes: Iterable[str]) -> re.Pattern:
    c, s = "|".join(colours), "|".join(shapes)
    return re.compile(rf"\b({c}) ({s}) ({_VERB})(?: (?:to the )?(left|right|up|down|{c}))?\b")


def parse_events(caption: str, vocabulary: dict) -> list[tuple]:
    """The events a caption states, in text order: ``(colour, shape, action, colour_to or None)``."""
    pattern = _clause_re(vocabulary["colours"], vocabulary["shapes"])
    out = []
    for colour, shape, verb, arg in pattern.findall(caption.lower()):
        if verb in ("moves", "slides"):
            action, to = (arg if arg in ("left", "right", "up", "down") else "move?"), None
        elif verb in ("appears", "shows up"):
            action, to = "appear", None
        elif verb in ("disappears", "vanishes"):
            action, to = "disappear", None
        else:
            action, to = "turn", (arg or None)
        out.append((colour, shape, action, to))
    return out


def scene_events(scene: dict) -> list[tuple]:
    """A manifest scene's events in time order as ``(colour, shape, action, colour_to or None)``."""
    objects = scene["objects"]
    return [(objects[e["obj"]]["colour"], objects[e["obj"]]["shape"], e["action"],
             e.get("colour_to") if e["action"] == "turn" else None) for e in scene["events"]]


def attribute_match(caption: str, scene: dict, vocabulary: dict) -> bool:
    """True when the caption names every attribute of the scene's events, in order, and no other event."""
    return parse_events(caption, vocabulary) == scene_events(scene)


# ---------------------------------------------------------------------------------------------------------------
# open-ended QA pairs from a scene


def qa_pairs(scene: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs about one scene: first / last event, each object's action, the event count."""
    from hbi_training.data.captions import clause
    from hbi_training.data.scenes import Scene

    s = Scene.from_dict(scene)
    pairs = [("what happens first?", clause(s, s.events[0])),
             ("what happens last?", clause(s, s.events[-1])),
             ("how many events are there?", NUMBERS[len(s.events)])]
    for e in s.events:
        obj = s.objects[e.obj]
        full = clause(s, e, article="the")
        pairs.append((f"what does the {obj.colour} {obj.shape} do?",
                      full.removeprefix(f"the {obj.colour} {obj.shape} ")))
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# features: the frozen video side, computed once


def video_sides(package: Path, data_dir: Path, split: str, cache_dir: Path,
                progress: Callable[[str], None] = lambda _: None) -> dict[str, np.ndarray]:
    """The 9 video side arrays of a split, through the package's video encoder; cached by package + frames.
    ``progress`` is told when the stage starts."""
    import hbi_runtime
    from hbi_training.data import frame_cache

    progress(f"video side of the {split} split (cached after the first run)")
    with hbi_runtime.load(package) as model:
        pre = model.manifest.preprocessing
        frames, mask = frame_cache(data_dir, split, max_frames=pre.max_frames, image_size=pre.image_size)
        key = hashlib.sha256(f"{model.package.manifest_sha256}|{frames.shape}|{float(np.asarray(frames[:4]).sum())}"
                             f"|{mask.tobytes().hex()[:4096]}".encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"sides-{split}-{key}.npz"
        if path.is_file():
            with np.load(path) as z:
                return {k: z[k] for k in SIDE_NAMES}
        parts = []
        for i in range(0, len(frames), 256):
            side = model.encode_frames(np.asarray(frames[i:i + 256]), mask[i:i + 256])
            parts.append([a for lv in side.levels for a in (lv.tokens, lv.weights, lv.mask)])
        out = {n: np.concatenate([p[j] for p in parts]).astype(np.float32) for j, n in enumerate(SIDE_NAMES)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".tmp.npz"), **out)
    path.with_suffix(".tmp.npz").replace(path)
    return out


def patch_encoder(checkpoint: Path, package: Path, grid: int, embed_dim: int):
    """The decoder's :class:`~hbi_export.tasks.decoder.PatchEncoder` with the vision tower of the retrieval
    ``checkpoint``, checked against ``package``: the package's video side of two random frame stacks must equal
    the checkpoint's (1e-3), so that the patch tokens come from the very model whose video side the decoder
    reads. Returns (encoder, the tower's VisionConfig fields)."""
    import torch
    from hbi_export.checkpoints.loader import load_checkpoint
    from hbi_export.model.hbi import HBIModel
    from hbi_export.tasks.decoder import DecoderConfig, PatchEncoder

    import hbi_runtime

    sd, config, _ = load_checkpoint(checkpoint)
    model = HBIModel(config)
    model.load_state_dict(sd, strict=True)
    model.eval()
    with hbi_runtime.load(package) as retrieval:
        pre = retrieval.manifest.preprocessing
        frames = np.random.default_rng(0).normal(size=(2, pre.max_frames, 3, pre.image_size, pre.image_size))
        frames = frames.astype(np.float32)
        mask = np.ones((2, pre.max_frames), dtype=np.int64)
        want = retrieval.encode_frames(frames, mask).levels[0].tokens
    with torch.no_grad():
        got = model.encode_video(torch.from_numpy(frames), torch.from_numpy(mask)).levels[0].tokens.numpy()
    if want.shape != got.shape or float(np.abs(want - got).max()) > 1e-3:
        raise UsageError(f"{checkpoint} is not the checkpoint {package} was exported from (their video sides "
                         "differ)", hint="pass the checkpoint the retrieval package was exported from (--checkpoint)")
    vision = asdict(config.vision)
    try:
        decoder_config = DecoderConfig(embed_dim=embed_dim, patch_grid=grid, patch_vision=vision)
    except BadInputError as exc:  # here the grid is an option of this run, not a field of a file
        side = config.vision.grid
        raise UsageError(f"--patch-grid: {exc}", hint="use one of "
                         + ", ".join(str(g) for g in range(1, side + 1) if side % g == 0)) from None
    encoder = PatchEncoder(decoder_config)
    encoder.load_tower(model.clip.visual)
    return encoder.eval(), vision


def video_patches(encoder, data_dir: Path, split: str, cache_dir: Path, max_frames: int, image_size: int,
                  progress: Callable[[str], None] = lambda _: None) -> np.ndarray:
    """``encoder`` (a PatchEncoder) on every video of a split: float16 ``(N, T, grid * grid, width)``, cached
    by the encoder's weights + frames + grid (float16 halves the cache; the decoder reads them in float32)."""
    import torch
    from hbi_training.data import frame_cache

    progress(f"patch tokens of the {split} split (cached after the first run)")
    frames, _ = frame_cache(data_dir, split, max_frames=max_frames, image_size=image_size)
    weights = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().numpy().tobytes())
    key = hashlib.sha256(f"{weights.hexdigest()}|{frames.shape}|{float(np.asarray(frames[:4]).sum())}|"
                         f"{encoder.grid}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"patches-{split}-{key}.npy"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                        shape=(len(frames), frames.shape[1], encoder.grid ** 2,
                                               encoder.conv1.out_channels))
        for i in range(0, len(frames), 128):
            with torch.no_grad():
                out[i:i + 128] = encoder(torch.from_numpy(np.array(frames[i:i + 128], dtype=np.float32))).numpy()
        out.flush()
        del out
        tmp.replace(path)
    return np.load(path)


# ---------------------------------------------------------------------------------------------------------------
# sequences


@dataclass
class Sequences:
    """Training rows: video index, token ids (decoder indices) and how many leading tokens are prefix."""

    video: np.ndarray  # (R,)
    ids: np.ndarray  # (R, Lmax) int64, padded with EOT (masked out of the loss)
    prefix: np.ndarray  # (R,) prefix length (>= 1: SOT)
    length: np.ndarray  # (R,) tokens incl. SOT and EOT


def build_vocab(texts: Iterable[str], tokenizer: ClipTokenizer) -> tuple[int, ...]:
    ids = {SOT_ID, EOT_ID}
    for t in texts:
        ids.update(tokenizer.encode(t))
    return tuple(sorted(ids))


def training_texts(videos: list[dict], captions: str, qa: bool) -> list[str]:
    """Every text the decoder trains on (its vocabulary is built from these)."""
    texts = [c for v in videos for c in (v["captions"] if captions == "all" else v["captions"][:1])]
    if qa:
        texts += [t for v in videos for pair in qa_pairs(v["scene"]) for t in pair]
    return texts


def make_sequences(videos: list[dict], tokenizer: ClipTokenizer, vocab, *, captions: str, qa: bool,
                   max_positions: int) -> Sequences:
    rows = []
    for i, v in enumerate(videos):
        texts = v["captions"][:1] if captions == "canonical" else v["captions"]
        for c in texts:
            rows.append((i, [SOT_ID], tokenizer.encode(c)))
        if qa:
            for q, a in qa_pairs(v["scene"]):
                rows.append((i, [SOT_ID] + tokenizer.encode(q), tokenizer.encode(a)))
    lmax = max(len(p) + len(a) + 1 for _, p, a in rows)
    if lmax > max_positions:
        raise UsageError(f"a training sequence has {lmax} tokens, more than the decoder's {max_positions} positions")
    ids = np.full((len(rows), lmax), vocab.eot, dtype=np.int64)
    for r, (_, p, a) in enumerate(rows):
        seq = vocab.to_local(p + a + [EOT_ID])
        ids[r, :len(seq)] = seq
    return Sequences(np.array([r[0] for r in rows]), ids, np.array([len(r[1]) for r in rows]),
                     np.array([len(r[1]) + len(r[2]) + 1 for r in rows]))


# ---------------------------------------------------------------------------------------------------------------
# training


def _lr_at(step: int, s: CaptionTrainSettings) -> float:
    warm = max(1, int(s.warmup * s.steps))
    if step < warm:
        return s.lr * (step + 1) / warm
    return 0.5 * s.lr * (1 + math.cos(math.pi * (step - warm) / max(1, s.steps - warm)))


def target_mask(seqs: Sequences):
    """(R, Lmax - 1) float: 1 where target token t + 1 counts (after the prefix, up to and including EOT)."""
    import torch

    pos = torch.arange(seqs.ids.shape[1] - 1)[None]
    return ((pos >= torch.from_numpy(seqs.prefix)[:, None] - 1)
            & (pos < torch.from_numpy(seqs.length)[:, None] - 1)).float()


def teacher_forcing_loss(model, side: tuple, ids, mask, token_dropout: float = 0.0, generator=None):
    """Mean cross entropy of the next tokens of ``ids`` (B, n) where ``mask`` (B, n - 1) is 1.

    ``token_dropout``: each *input* token that is itself a target (a caption / answer word, never SOT or a
    question's words) is replaced by the decoder's unknown row with this probability, so that the next word must
    come from the video more than from the words before it (train-caption combination statistics)."""
    import torch

    inputs = ids[:, :-1]
    if token_dropout > 0:
        is_target = torch.zeros_like(mask, dtype=torch.bool)
        is_target[:, 1:] = mask[:, :-1] > 0  # input i is the target of position i - 1
        # drawn on the CPU (the generator's device), so a run draws the same words on any device
        drop = is_target & (torch.rand(inputs.shape, generator=generator).to(ids.device) < token_dropout)
        inputs = torch.where(drop, torch.full_like(inputs, model.config.vocab_size), inputs)
    logp = model(side, inputs)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (nll * mask).sum() / mask.sum()


def torch_greedy(model, side: tuple, prefix: list[int], eot: int, max_new: int) -> list[list[int]]:
    """Greedy decoding in PyTorch with the cache (training-time evaluation; the runtime has its own)."""
    import torch

    with torch.no_grad():
        cross, bias = model.cross_cache(side)
        b = side[0].shape[0]
        ids = torch.tensor([prefix] * b, device=side[0].device)
        logp, past = model.decode(ids, None, cross, bias)
        out = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=side[0].device)
        for _ in range(max_new):
            nxt = logp.argmax(-1)
            picked, live = nxt.tolist(), done.tolist()
            for i in range(b):
                if not live[i]:
                    out[i].append(picked[i])
            done |= nxt == eot
            if bool(done.all()):
                break
            logp, past = model.decode(nxt[:, None], past, cross, bias)
    return [o[:-1] if o and o[-1] == eot else o for o in out]


def evaluate(model, sides: dict, videos: list[dict], vocab, tokenizer: ClipTokenizer, vocabulary: dict,
             max_new: int = 40) -> dict[str, Any]:
    """Greedy captions of ``videos`` (PyTorch) -> attribute accuracy and the captions."""
    import torch

    device = next(model.parameters()).device
    side = tuple(torch.from_numpy(np.asarray(sides[n], dtype=np.float32)).to(device) for n in side_names(sides))
    model.eval()
    captions = []
    for i in range(0, len(videos), 128):
        part = tuple(t[i:i + 128] for t in side)
        for seq in torch_greedy(model, part, [vocab.sot], vocab.eot, max_new):
            captions.append(tokenizer.decode(vocab.to_clip(seq)))
    hits = [attribute_match(c, v["scene"], vocabulary) for c, v in zip(captions, videos)]
    return {"attribute_accuracy": float(np.mean(hits)), "captions": captions, "hits": hits}


def side_names(sides: dict) -> tuple[str, ...]:
    """The decoder's side arrays in input order: the 9 of ``SIDE_NAMES``, then ``video_patches`` if present."""
    return SIDE_NAMES + (("video_patches",) if "video_patches" in sides else ())


def check_decoder_start(start, config, path) -> None:
    """Refuse to continue decoder ``start`` (loaded from ``path``) where this run builds ``config``: a different
    vocabulary or memory shape would silently mis-read tokens."""
    shape = ("embed_dim", "tokens_per_level", "levels", "max_positions", "vocab_ids", "frame_deltas", "patch_grid",
             "patch_vision")
    if any(getattr(start.config, k) != getattr(config, k) for k in shape):
        raise UsageError(f"{path}: its vocabulary or memory shape differs from this run's",
                         hint="continue a decoder trained on the same data set and retrieval model family")


def train_caption(s: CaptionTrainSettings, progress: Callable[[str], None] = lambda _: None, *,
                  bar: bool = False) -> dict[str, Any]:
    """Features once, then the decoder (module docstring). Returns the summary (also ``OUT/summary.json``).

    ``progress`` is told each stage as it starts, and every ``log_every`` steps the loss unless ``bar``: then a
    step bar (:class:`~hbi_training.progress.ProgressBar`, on a terminal) shows it."""
    import torch
    from hbi_export.tasks.decoder import CaptionDecoder, DecoderConfig, VocabMap, save_decoder
    from hbi_training.progress import ProgressBar

    import hbi_runtime

    progress = progress or (lambda _: None)
    if s.steps < 1 or s.batch_size < 1:
        raise UsageError("--steps and --batch-size must be >= 1")
    if s.captions not in ("canonical", "all"):
        raise UsageError(f"--captions must be 'canonical' or 'all', got {s.captions!r}")
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocabulary, train_v, test_v = read_splits(s.data_dir)
    start = None
    if s.init_decoder is not None:
        from hbi_export.tasks.decoder import load_decoder

        start, _ = load_decoder(s.init_decoder)  # before the features: a wrong folder fails at once
    with hbi_runtime.load(s.package) as retrieval:
        pkg_hash = retrieval.package.manifest_sha256
        pm = retrieval.manifest
        tokenizer = retrieval.tokenizer
        tokens_per_level = tuple(pm.tokens_per_level["video"])
        embed_dim = pm.embed_dim
    encoder, vision = None, None
    if s.patch_grid:  # before the features: a wrong checkpoint or grid fails at once
        if s.checkpoint is None:
            raise UsageError("a spatial memory (--patch-grid) needs the retrieval checkpoint",
                             hint="pass --checkpoint DIR (the one the retrieval package was exported from)")
        progress(f"patch encoder from {s.checkpoint}")
        encoder, vision = patch_encoder(s.checkpoint, s.package, s.patch_grid, embed_dim)
    sides = {split: video_sides(s.package, s.data_dir, split, out / "cache", progress) for split in ("train", "test")}
    if encoder is not None:
        for split in ("train", "test"):
            sides[split]["video_patches"] = video_patches(encoder, s.data_dir, split, out / "cache",
                                                          pm.preprocessing.max_frames, pm.preprocessing.image_size,
                                                          progress)
    texts = training_texts(train_v, s.captions, s.qa)
    config = DecoderConfig(embed_dim=embed_dim, tokens_per_level=tokens_per_level, levels=s.levels, width=s.width,
                           layers=s.layers, heads=s.heads, vocab_ids=build_vocab(texts, tokenizer),
                           dropout=s.dropout, frame_deltas=s.frame_deltas, patch_grid=s.patch_grid,
                           patch_vision=vision)
    vocab = VocabMap(config)
    seqs = make_sequences(train_v, tokenizer, vocab, captions=s.captions, qa=s.qa,
                          max_positions=config.max_positions)
    model = CaptionDecoder(config)
    if start is not None:
        check_decoder_start(start, config, s.init_decoder)
        model, config = start, start.config
    if encoder is not None:  # the frozen copy of the retrieval tower (exported as frame_patches)
        model.patch_encoder.load_state_dict(encoder.state_dict(), strict=True)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2 and "embedding" not in n]
    other = [p for n, p in trainable if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=s.lr)
    side_t = [torch.from_numpy(sides["train"][n]) for n in side_names(sides["train"])]
    ids_t, video_t = torch.from_numpy(seqs.ids), torch.from_numpy(seqs.video)
    loss_mask_all = target_mask(seqs)
    rng = np.random.default_rng(s.seed)
    is_qa = seqs.prefix > 1
    caption_rows, qa_rows = np.flatnonzero(~is_qa), np.flatnonzero(is_qa)
    n_qa = int(round(s.qa_fraction * s.batch_size)) if len(qa_rows) else 0
    log = (out / "metrics.jsonl").open("w")
    progress(f"training the decoder: {s.steps} steps")
    steps_bar = ProgressBar(s.steps, 0, "decoder", enabled=bar, every=s.log_every)
    started = time.monotonic()
    model.train()
    running = 0.0
    for step in range(s.steps):
        rows = torch.from_numpy(np.concatenate([rng.choice(caption_rows, s.batch_size - n_qa),
                                                rng.choice(qa_rows, n_qa) if n_qa else np.zeros(0, np.int64)]))
        width = int(seqs.length[rows.numpy()].max())
        ids = ids_t[rows, :width]
        vid = video_t[rows]
        side = tuple(t[vid].float() for t in side_t)
        loss = teacher_forcing_loss(model, side, ids, loss_mask_all[rows, :width - 1], s.token_dropout,
                                    torch.Generator().manual_seed(s.seed * 100003 + step))
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        running += value
        steps_bar.update(step + 1, f"loss {value:.4f}")
        if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
            n = (step % s.log_every) + 1
            rec = {"step": step + 1, "loss": running / n, "lr": _lr_at(step, s),
                   "seconds": round(time.monotonic() - started, 1)}
            running = 0.0
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if not steps_bar.enabled:
                progress(f"step {step + 1}/{s.steps} loss {rec['loss']:.4f} ({rec['seconds']:.0f} s)")
    steps_bar.close()
    log.close()
    train_seconds = time.monotonic() - started
    progress(f"held-out captions of {len(test_v)} videos (PyTorch greedy)")
    result = evaluate(model, sides["test"], test_v, vocab, tokenizer, vocabulary)
    progress(f"held-out attribute accuracy (PyTorch greedy): {100 * result['attribute_accuracy']:.1f} % "
             f"of {len(test_v)} videos")
    settings = {k: _recorded(v, s.recorded_as) for k, v in asdict(s).items() if k != "recorded_as"}
    summary = {"retrieval_manifest_sha256": pkg_hash, "settings": settings, "train_seconds": train_seconds,
               "train_rows": int(len(seqs.video)), "train_videos": len(train_v),
               "test_attribute_accuracy": result["attribute_accuracy"],
               "test_videos": len(test_v), "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "frozen_parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
    save_decoder(model.eval(), out / "decoder", extra={"training": summary})
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "test_captions.json").write_text(json.dumps(
        [{"video": v["file"], "caption": c, "reference": v["captions"][0], "match": h}
         for v, c, h in zip(test_v, result["captions"], result["hits"])], indent=1) + "\n")
    summary["decoder"] = str(out / "decoder")
    return summary


def _recorded(value: Any, recorded_as: tuple[Path, Path] | None) -> Any:
    """A setting as summary.json records it: a path as text, under ``recorded_as[1]`` when it lies in
    ``recorded_as[0]``."""
    if not isinstance(value, Path):
        return value
    if recorded_as is not None and value.is_relative_to(recorded_as[0]):
        value = recorded_as[1] / value.relative_to(recorded_as[0])
    return str(value)


def read_splits(data_dir: Path) -> tuple[dict, list[dict], list[dict]]:
    """A synthetic set's vocabulary and its train and test videos (manifest entries, in order)."""
    from hbi_training.data import read_manifest

    manifest = read_manifest(data_dir)
    videos = manifest["videos"]
    return (manifest["vocabulary"], [v for v in videos if v["split"] == "train"],
            [v for v in videos if v["split"] == "test"])


def settings_with(base: CaptionTrainSettings, **changes) -> CaptionTrainSettings:
    return replace(base, **{k: v for k, v in changes.items() if v is not None})


def check_data(data_dir: Path) -> None:
    if not (Path(data_dir) / "manifest.json").is_file():
        raise BadInputError(f"{data_dir} is not a synthetic data set (no manifest.json)",
                            hint="render one: `python -m hbi_training.data.synthetic --out DIR --train 2400 "
                                 "--test 120 --seed 0`")


def export_run(decoder_dir: Path, package: Path, out: Path, data_dir: Path | None, *, overwrite: bool = True,
               fixtures: int = 8, progress: Callable[[str], None] | None = None) -> dict:
    """A trained decoder folder -> caption package at ``out`` (parity on ``fixtures`` held-out videos of
    ``data_dir``, or on the demo samples / random sides when there is no data set).

    ``out`` follows :func:`hbi_runtime.outputs.prepare_output_dir` (kind ``caption package``; never the decoder
    folder, the retrieval package or the data set; replaced only when the new package is complete).

    Raises:
        UsageError: ``out`` may not be written; BadInputError: ``decoder_dir`` is not a decoder folder."""
    import hbi_runtime
    from hbi_export.tasks.caption import write_caption_package
    from hbi_export.tasks.decoder import load_decoder
    from hbi_runtime.outputs import prepare_output_dir

    prepare_output_dir(out, kind="caption package", inputs=[decoder_dir, package, data_dir], overwrite=overwrite)
    progress = progress or (lambda _: None)
    progress(f"caption package {out}: export and parity check")
    model, meta = load_decoder(decoder_dir)
    videos = None
    if data_dir is not None:
        from hbi_training.data import read_manifest

        test = [v for v in read_manifest(data_dir)["videos"] if v["split"] == "test"][:fixtures]
        videos = [str(Path(data_dir) / v["file"]) for v in test]
    else:
        samples = Path(hbi_runtime.__file__).resolve().parent / "data" / "demo" / "samples"
        videos = sorted(str(p) for p in samples.glob("*.mp4"))[:fixtures] or None
    return write_caption_package(model, package, out, training=meta.get("training", {}), overwrite=overwrite,
                                 fixture_videos=videos, inputs=[decoder_dir, data_dir], progress=progress)
