"""Joint fine-tune: the retrieval model's video tower learns to carry what the caption decoder must name.

::

    hbi-train caption-joint --data DIR --out RUN [--init hbi_runtime/data/demo/checkpoint] [--steps 3000]

Why: the caption decoder (``hbi_export.tasks.decoder``) only reads the retrieval model's video side, and a side
trained for retrieval alone need not encode every attribute a caption names (the demo's barely encoded shapes
and motions, docs/captioning.md). Here the whole retrieval model and a decoder train together:

    loss = HBI retrieval objective (entity / action / event InfoNCE, self-distillation, Banzhaf KL when an
           estimator is given; ``hbi_training.losses``)
         + caption_weight * teacher-forcing cross entropy of the decoder reading the *differentiable* video side
           of ``HBIModel.encode_video`` (exactly the side the exported ``video_encoder.onnx`` computes)

Each batch holds ``batch_size`` distinct train videos with one caption each (``RandomCaptionSampler``: the
contrastive half); the decoder sees, per video, its canonical caption and one QA pair of its scene
(``hbi_training.caption.qa_pairs``, drawn from ``(seed, step)``). The loop is the common one
(``hbi_training.loop.fit``: AdamW parameter groups, warmup-cosine, clipping, checkpoints, resume), so a run is
seeded and resumable. Validation (every ``val_every`` steps and at the end) reports t2v R@1 on the held-out split
and the held-out attribute accuracy of PyTorch greedy captions (``hbi_training.caption.attribute_match``).

Output: ``RUN/final/`` (the retrieval checkpoint, ``hbi_export.checkpoints`` format) and ``RUN/decoder/``
(``save_decoder``: the caption decoder, trained on that model's side), ``RUN/summary.json``. Export the two with
``hbi-export caption-joint-export`` (or :func:`write_joint_artifacts`): a retrieval package + caption package laid
out like ``hbi_runtime/data/demo``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from hbi_runtime.errors import UsageError
from hbi_training.caption import (SIDE_NAMES, Sequences, build_vocab, evaluate, make_sequences, qa_pairs,
                                  target_mask, teacher_forcing_loss, training_texts)
from hbi_training.levels import level_outputs
from hbi_training.losses import MAX_LOGIT_SCALE, HBILoss, LossConfig, LossOutput

DECODER_DIR = "decoder"


@dataclass(frozen=True)
class JointSettings:
    data_dir: Path
    out_dir: Path
    init: Path | None = None  # retrieval checkpoint to start from (None: random, ``model_preset``)
    model_preset: str = "demo"
    estimator: Path | None = None  # Banzhaf teacher; None: no Banzhaf KL term
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3  # HBI heads and decoder; the CLIP towers at lr * clip_lr_coef (the optimiser's groups)
    clip_lr_coef: float = 1.0
    weight_decay: float = 0.05
    warmup: float = 0.1
    caption_weight: float = 1.0
    aux_weight: float = 0.0  # per-frame attribute loss (training-only head, never exported); 0: off
    aux_events: bool = True  # the per-frame loss also names the event each frame shows (with aux_weight > 0)
    token_dropout: float = 0.0  # decoder input words replaced by "unknown" with this probability (training)
    init_decoder: Path | None = None  # continue this decoder folder (e.g. an earlier run's RUN/decoder)
    qa: bool = True
    width: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    frame_deltas: bool = False  # DecoderConfig.frame_deltas (consecutive-frame difference tokens in the memory)
    seed: int = 0
    threads: int = 1
    device: str = "cpu"  # auto, cpu, cuda, cuda:N (hbi_training.runs.resolve_device); CUDA runs use fp32
    max_frames: int = 8
    max_words: int = 32
    val_every: int = 500  # 0: only at the end (validation draws DataLoader seeds: it is part of the recipe)
    train_eval_videos: int = 120  # also report the attribute accuracy of the first N train videos (0: no)
    log_every: int = 10
    progress: bool = True


# ---------------------------------------------------------------------------------------------------------------
# the side as the decoder reads it


def side_tuple(side) -> tuple[torch.Tensor, ...]:
    """A VideoSide -> the decoder's 9 tensors (tokens, weights, mask per level), in ``SIDE_NAMES`` order."""
    return tuple(t for lv in side.levels for t in (lv.tokens, lv.weights, lv.mask))


@torch.no_grad()
def side_arrays(model, frames, mask, batch: int = 128) -> dict[str, np.ndarray]:
    """The video side of ``frames`` (N, T, 3, S, S) through ``model.encode_video``, as ``SIDE_NAMES`` arrays."""
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for i in range(0, len(frames), batch):
        side = model.encode_video(torch.from_numpy(np.array(frames[i:i + batch])).to(device),
                                  torch.from_numpy(np.array(mask[i:i + batch])).to(device))
        parts.append([t.float().cpu().numpy() for t in side_tuple(side)])
    return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(SIDE_NAMES)}


# ---------------------------------------------------------------------------------------------------------------
# per-frame attribute supervision (training only; the head is never saved with the model or exported)


def frame_times(config: dict[str, Any], max_frames: int) -> np.ndarray:
    """The time (s) each sampled frame shows, from the data set's config (fps, seconds) through the runtime's own
    sampling (``hbi_runtime.video.sample_indices``), i.e. the frames the frame cache holds."""
    from hbi_runtime.video import sample_indices

    fps = float(config["fps"])
    return sample_indices(int(round(fps * config["seconds"])), fps, max_frames) / fps


def frame_targets(videos: list[dict], times: np.ndarray, max_frames: int, colours: list[str], shapes: list[str]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per video, sampled frame and shape (``scenes.object_state`` at that frame's time): the class
    (0 absent / not visible, 1 + colour index) as int64 ``(N, T, S)`` (-100: no such frame) and the (x, y)
    centre as float32 ``(N, T, S, 2)`` (meaningful where the class is > 0)."""
    from hbi_training.data.scenes import Scene, object_state

    cls = np.full((len(videos), max_frames, len(shapes)), -100, dtype=np.int64)
    pos = np.zeros((len(videos), max_frames, len(shapes), 2), dtype=np.float32)
    for n, v in enumerate(videos):
        scene = Scene.from_dict(v["scene"])
        for k, t in enumerate(times):
            cls[n, k] = 0
            for i, obj in enumerate(scene.objects):
                state, j = object_state(scene, i, float(t)), shapes.index(obj.shape)
                if state.visible:
                    cls[n, k, j] = 1 + colours.index(state.colour)
                    pos[n, k, j] = (state.x, state.y)
    return cls, pos


def frame_event_targets(videos: list[dict], times: np.ndarray, max_frames: int, colours: list[str],
                        shapes: list[str], actions: list[str]) -> np.ndarray:
    """Per video, sampled frame and shape: the event that frame shows happening to that shape, as int64
    ``(N, T, S)``: 0 none, else ``1 + action index * len(colours) + colour index`` with the object's colour in
    the frame before (the colour a caption names, also for a "turn"); -100 where there is no such frame. A frame
    shows an event when the object's state (``scenes.object_state``: visible, colour, position) differs from the
    frame before; the first frame shows none."""
    from hbi_training.data.scenes import Scene, object_state

    out = np.full((len(videos), max_frames, len(shapes)), -100, dtype=np.int64)
    for n, v in enumerate(videos):
        scene = Scene.from_dict(v["scene"])
        out[n, :len(times)] = 0
        for e in scene.events:
            j = shapes.index(scene.objects[e.obj].shape)
            states = [object_state(scene, e.obj, float(t)) for t in times]
            for k in range(1, len(times)):
                if states[k] != states[k - 1]:
                    out[n, k, j] = 1 + actions.index(e.action) * len(colours) + colours.index(states[k - 1].colour)
    return out


class FrameAttributeHead(nn.Module):
    """A linear map from each entity-level (frame) token to, per shape, 1 + colours logits and an (x, y).

    The tokens are unit vectors; they are scaled by sqrt(D) first (unit variance per component). The head is new
    while the model it reads is already trained, and the loop gives every non-CLIP parameter one learning rate:
    its output is multiplied by ``gain`` with weights initialised ``gain`` times smaller, which leaves the start
    unchanged and makes each AdamW step move the head's outputs ``gain`` times further (measured: at gain 1 and lr
    1e-3 the position output had not even reached the targets' mean after 500 steps)."""

    def __init__(self, embed_dim: int, n_shapes: int, n_classes: int, gain: float = 10.0, n_events: int = 0
                 ) -> None:
        super().__init__()
        self.n_shapes, self.n_classes, self.scale, self.gain = n_shapes, n_classes, math.sqrt(embed_dim), gain
        self.n_events = n_events  # per-shape event classes (``frame_event_targets``); 0: no event output
        self.proj = nn.Linear(embed_dim, n_shapes * (n_classes + 2 + n_events))
        with torch.no_grad():
            self.proj.weight /= gain
            self.proj.bias /= gain

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D) -> class logits (B, T, S, C), positions (B, T, S, 2), event logits (B, T, S, E)."""
        c = self.n_classes
        out = (self.gain * self.proj(tokens * self.scale)).unflatten(-1, (self.n_shapes, c + 2 + self.n_events))
        return out[..., :c], out[..., c:c + 2], out[..., c + 2:]


def frame_attribute_loss(head: FrameAttributeHead, tokens: torch.Tensor, cls: torch.Tensor, pos: torch.Tensor,
                         events: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Cross entropy of the per-shape class (``class``), smooth-L1 of the position where the shape is visible
    (``position``) and, when the head has event outputs and ``events`` is given, cross entropy of the per-shape
    event (``event``)."""
    logits, where, event_logits = head(tokens)
    parts = {"class": nn.functional.cross_entropy(logits.reshape(-1, head.n_classes), cls.reshape(-1),
                                                  ignore_index=-100)}
    visible = cls > 0
    parts["position"] = (nn.functional.smooth_l1_loss(where[visible], pos[visible], beta=0.1)
                         if bool(visible.any()) else where.sum() * 0.0)
    if head.n_events and events is not None:
        parts["event"] = nn.functional.cross_entropy(event_logits.reshape(-1, head.n_events), events.reshape(-1),
                                                     ignore_index=-100)
    return parts


@torch.no_grad()
def frame_attribute_accuracy(head: FrameAttributeHead, entity_tokens: np.ndarray, cls: np.ndarray,
                             events: np.ndarray | None = None) -> dict[str, float]:
    """The head's per-(frame, shape) class accuracy (every class, and on present shapes only) on ``entity_tokens``
    (N, T, D) - whether shape + colour are linearly present per frame of, e.g., the held-out videos - and, with
    ``events`` (``frame_event_targets``) and an event output, its accuracy on the (frame, shape) cells that show
    an event."""
    head.eval()
    device = next(head.parameters()).device
    logits, _, event_logits = head(torch.from_numpy(np.asarray(entity_tokens, dtype=np.float32)).to(device))
    head.train(True)
    pred, cls = logits.argmax(-1).cpu().numpy(), np.asarray(cls)
    valid, present = cls >= 0, cls > 0
    out = {"frame_class_accuracy": float((pred == cls)[valid].mean()),
           "frame_present_accuracy": float((pred == cls)[present].mean())}
    if events is not None and head.n_events:
        happening = np.asarray(events) > 0
        out["frame_event_accuracy"] = float((event_logits.argmax(-1).cpu().numpy() == events)[happening].mean())
    return out


# ---------------------------------------------------------------------------------------------------------------
# the task the common loop trains


class JointTask:
    """HBI model + its loss + a caption decoder on its video side (the ``hbi_training.tasks.Task`` protocol)."""

    name = "hbi-caption-joint"

    def __init__(self, model: nn.Module, loss: HBILoss, decoder: nn.Module, seqs: Sequences,
                 video_index: dict[str, int], *, caption_weight: float, seed: int, evaluator=None,
                 aux: tuple[FrameAttributeHead, np.ndarray, ...] | None = None, aux_weight: float = 0.0,
                 token_dropout: float = 0.0) -> None:
        self.model, self.criterion, self.decoder = model, loss, decoder
        # aux: (head, class targets, position targets[, event targets]) in dataset row order (``frame_targets``,
        # ``frame_event_targets``)
        self.aux_head = aux[0] if aux is not None else None
        self.aux_targets = tuple(torch.from_numpy(t) for t in aux[1:]) if aux is not None else None
        self.aux_weight, self.token_dropout = aux_weight, token_dropout
        self.seqs, self.video_index, self.caption_weight, self.seed = seqs, video_index, caption_weight, seed
        self.evaluator = evaluator  # (task) -> dict of caption metrics, at validation
        self.steps_done = 0
        self.ids = torch.from_numpy(seqs.ids)
        self.mask = target_mask(seqs)
        is_qa = seqs.prefix > 1
        n_videos = int(seqs.video.max()) + 1
        self.caption_rows = [[] for _ in range(n_videos)]
        self.qa_rows = [[] for _ in range(n_videos)]
        for r, (v, q) in enumerate(zip(seqs.video, is_qa)):
            (self.qa_rows if q else self.caption_rows)[int(v)].append(r)

    def to(self, device: torch.device) -> "JointTask":
        for m in self.modules():
            m.to(device)
        return self

    def train(self, mode: bool = True) -> None:
        for m in self.modules():
            m.train(mode)

    def modules(self) -> list[nn.Module]:
        return [self.model, self.criterion, self.decoder] + ([self.aux_head] if self.aux_head is not None else [])

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        aux = self.aux_head.named_parameters() if self.aux_head is not None else ()
        return itertools.chain(self.model.named_parameters(), self.criterion.named_parameters(),
                               ((f"decoder.{n}", p) for n, p in self.decoder.named_parameters()),
                               ((f"aux.{n}", p) for n, p in aux))

    def decoder_rows(self, videos: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per batch video: its canonical caption row and one QA row (drawn from (seed, step)).

        Returns (rows, position of the row's video in the batch)."""
        rng = np.random.default_rng([self.seed, 17, self.steps_done])
        rows, owner = [], []
        for k, v in enumerate(videos):
            for pool in (self.caption_rows[v], self.qa_rows[v]):
                if pool:
                    rows.append(pool[int(rng.integers(len(pool)))])
                    owner.append(k)
        return np.array(rows), np.array(owner)

    def loss(self, batch) -> LossOutput:
        ids, tmask, frames, fmask, vids = batch
        text = self.model.encode_text(ids, tmask)
        video = self.model.encode_video(frames, fmask)
        levels = level_outputs(text, video, self.criterion.config.levels)
        with torch.autocast(ids.device.type, enabled=False):
            out = self.criterion(levels, self.model.clip.logit_scale.float().exp())
            index = [self.video_index[str(v)] for v in vids]
            rows, owner = self.decoder_rows(index)
            width = int(self.seqs.length[rows].max())
            pick = torch.from_numpy(owner).to(ids.device)
            side = tuple(t.float()[pick] for t in side_tuple(video))
            rows_t = torch.from_numpy(rows)
            caption = teacher_forcing_loss(self.decoder, side, self.ids[rows_t, :width].to(ids.device),
                                           self.mask[rows_t, :width - 1].to(ids.device),
                                           self.token_dropout if self.decoder.training else 0.0,
                                           torch.Generator().manual_seed(self.seed * 100003 + self.steps_done))
            aux = {}
            if self.aux_head is not None:
                targets = [t[torch.tensor(index)].to(ids.device) for t in self.aux_targets]
                aux = frame_attribute_loss(self.aux_head, video.levels[0].tokens.float(), *targets)
        parts = {**out.parts, "caption": caption, **{f"aux_{k}": v for k, v in aux.items()}}
        total = out.total + self.caption_weight * caption
        if aux:
            total = total + self.aux_weight * sum(aux.values())
        return LossOutput(total, parts)

    @torch.no_grad()
    def after_step(self) -> None:
        self.model.clip.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
        self.steps_done += 1

    def save_weights(self, directory: Path) -> None:
        from hbi_export.checkpoints import save_model
        from hbi_export.tasks.decoder import save_decoder

        save_model(self.model, directory)
        save_decoder(self.decoder, Path(directory) / DECODER_DIR)

    def load_weights(self, directory: Path) -> None:
        from hbi_export.tasks.decoder import load_decoder
        from hbi_training.tasks import HBITask

        HBITask(self.model, self.criterion).load_weights(directory)
        decoder, _ = load_decoder(Path(directory) / DECODER_DIR)
        self.decoder.load_state_dict(decoder.state_dict(), strict=True)

    def extra_state(self) -> dict[str, Any]:
        state = {"criterion": self.criterion.state_dict(), "steps_done": self.steps_done}
        if self.aux_head is not None:
            state["aux_head"] = self.aux_head.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.criterion.load_state_dict(state["criterion"], strict=True)
        self.steps_done = int(state["steps_done"])
        if self.aux_head is not None and "aux_head" in state:
            self.aux_head.load_state_dict(state["aux_head"], strict=True)

    def validate(self, dataset, batch_size: int, device: torch.device) -> dict[str, float]:
        from hbi_training.evaluate import retrieval_recall

        metrics = retrieval_recall(self.model, dataset, batch_size=batch_size, device=device)
        if self.evaluator is not None:
            metrics.update(self.evaluator(self))
        return metrics


# ---------------------------------------------------------------------------------------------------------------
# the run


def _log_to(progress: Callable[[str], None] | None) -> Callable[[str], None]:
    return progress or (lambda _: None)


def caption_accuracy(task: JointTask, frames, mask, videos: list[dict], vocab, tokenizer, vocabulary: dict
                     ) -> dict[str, Any]:
    """PyTorch greedy captions of ``videos`` on the task's current model side -> attribute accuracy + captions."""
    task.decoder.eval()
    sides = side_arrays(task.model, frames, mask)
    result = evaluate(task.decoder, sides, videos, vocab, tokenizer, vocabulary)
    task.train(True)
    return {**result, "sides": sides}


def qa_accuracy(decoder, sides: dict[str, np.ndarray], videos: list[dict], vocab, tokenizer,
                max_new: int = 24) -> dict[str, Any]:
    """Exact match of PyTorch greedy answers to every QA pair of ``videos`` (grouped by question)."""
    from hbi_training.caption import torch_greedy

    decoder.eval()
    by_question: dict[str, list[tuple[int, str]]] = {}
    for i, v in enumerate(videos):
        for q, a in qa_pairs(v["scene"]):
            by_question.setdefault(q, []).append((i, a))
    hits: dict[str, list[bool]] = {}
    for q, items in by_question.items():
        pick = np.array([i for i, _ in items])
        side = tuple(torch.from_numpy(sides[n][pick]).to(next(decoder.parameters()).device) for n in SIDE_NAMES)
        prefix = [vocab.sot] + vocab.to_local(tokenizer.encode(q))
        answers = torch_greedy(decoder, side, prefix, vocab.eot, max_new)
        kind = q.split(" the ")[0] if q.startswith("what does") else q
        hits.setdefault(kind, []).extend(tokenizer.decode(vocab.to_clip(s)) == a for s, (_, a) in zip(answers, items))
    every = [h for v in hits.values() for h in v]
    return {"exact_match": float(np.mean(every)), "questions": len(every),
            "per_question": {k: float(np.mean(v)) for k, v in hits.items()}}


def run_joint(s: JointSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune retrieval model + decoder together (module docstring). Returns the summary (``summary.json``)."""
    from hbi_export.tasks.decoder import CaptionDecoder, DecoderConfig, VocabMap, save_decoder
    from hbi_runtime.tokenizer import ClipTokenizer
    from hbi_training.banzhaf import load_estimator_state
    from hbi_training.caption import read_splits
    from hbi_training.loop import LoopConfig, fit, seed_everything
    from hbi_training.optim import OptimConfig
    from hbi_training.runs import (FitSettings, _train_data, build_start_model, open_split, resolve_device,
                                   resolve_estimator)

    log = _log_to(progress)
    if s.steps < 1 or s.batch_size < 2 or s.caption_weight < 0:
        raise UsageError("need --steps >= 1, --batch-size >= 2 and --caption-weight >= 0")
    torch.set_num_threads(s.threads)
    device = resolve_device(s.device)
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocabulary, train_v, test_v = read_splits(s.data_dir)
    log("model, estimator and data (the videos are decoded on first use)")

    fs = FitSettings(data_dir=Path(s.data_dir), out_dir=out, model_preset=s.model_preset, init=s.init,
                     batch_size=s.batch_size, seed=s.seed, device="cpu", max_frames=s.max_frames,
                     max_words=s.max_words, steps=s.steps, progress=s.progress)
    seed_everything(s.seed)
    model = build_start_model(fs).train()
    teacher = None
    if s.estimator is not None:
        teacher = load_estimator_state(resolve_estimator(s.estimator), LossConfig().planes)
    criterion = HBILoss(LossConfig(banzhaf=teacher is not None), teacher)
    train, sampler, _ = _train_data(fs, model.config)
    test = open_split(fs, "test", model.config)
    if [v["id"] for v in train_v] != train.video_ids:
        raise UsageError(f"{s.data_dir}: the manifest's train videos differ from the dataset's")

    tokenizer = ClipTokenizer()
    config = DecoderConfig(embed_dim=model.config.embed_dim,
                           tokens_per_level=(s.max_frames, *model.config.cluster_counts(s.max_frames, "video")),
                           width=s.width, layers=s.layers, heads=s.heads, dropout=s.dropout,
                           frame_deltas=s.frame_deltas,
                           vocab_ids=build_vocab(training_texts(train_v, "canonical", s.qa), tokenizer))
    vocab = VocabMap(config)
    seqs = make_sequences(train_v, tokenizer, vocab, captions="canonical", qa=s.qa,
                          max_positions=config.max_positions)
    decoder = CaptionDecoder(config)
    if s.init_decoder is not None:
        from hbi_export.tasks.decoder import load_decoder
        from hbi_training.caption import check_decoder_start

        start, _ = load_decoder(s.init_decoder)
        check_decoder_start(start, config, s.init_decoder)
        decoder.load_state_dict(start.state_dict(), strict=True)
    aux = test_aux = None
    if s.aux_weight > 0:
        from hbi_training.data.manifest import read_manifest

        times = frame_times(read_manifest(s.data_dir)["config"], s.max_frames)
        colours, shapes = list(vocabulary["colours"]), list(vocabulary["shapes"])
        actions = list(vocabulary["actions"])
        n_events = 1 + len(actions) * len(colours) if s.aux_events else 0
        aux = (FrameAttributeHead(model.config.embed_dim, len(shapes), 1 + len(colours), n_events=n_events),
               *frame_targets(train_v, times, s.max_frames, colours, shapes),
               *([frame_event_targets(train_v, times, s.max_frames, colours, shapes, actions)] if n_events else []))
        test_aux = (frame_targets(test_v, times, s.max_frames, colours, shapes)[0],
                    frame_event_targets(test_v, times, s.max_frames, colours, shapes, actions) if n_events else None)

    n_train_eval = min(s.train_eval_videos, len(train_v))

    def evaluator(task: JointTask) -> dict[str, float]:
        t0 = time.monotonic()
        held = caption_accuracy(task, test.frames, test.frame_mask, test_v, vocab, tokenizer, vocabulary)
        metrics = {"attribute_accuracy": 100 * held["attribute_accuracy"]}
        if task.aux_head is not None:
            entity = held["sides"][SIDE_NAMES[0]]
            metrics.update({f"test_{k}": 100 * v for k, v in
                            frame_attribute_accuracy(task.aux_head, entity, *test_aux).items()})
        if n_train_eval:
            seen = caption_accuracy(task, train.frames[:n_train_eval], train.frame_mask[:n_train_eval],
                                    train_v[:n_train_eval], vocab, tokenizer, vocabulary)
            metrics["train_attribute_accuracy"] = 100 * seen["attribute_accuracy"]
        log(f"step {task.steps_done}: held-out attribute accuracy {metrics['attribute_accuracy']:.1f} %"
            + (f", train {metrics['train_attribute_accuracy']:.1f} %" if n_train_eval else "")
            + (f", held-out per-frame shape/colour {metrics['test_frame_present_accuracy']:.1f} % of present"
               if task.aux_head is not None else "")
            + (f", events {metrics['test_frame_event_accuracy']:.1f} %" if "test_frame_event_accuracy" in metrics
               else "")
            + f" ({time.monotonic() - t0:.0f} s)")
        return metrics

    task = JointTask(model, criterion, decoder, seqs, train.video_index, caption_weight=s.caption_weight,
                     seed=s.seed, evaluator=evaluator, aux=aux, aux_weight=s.aux_weight,
                     token_dropout=s.token_dropout)
    loop = LoopConfig(steps=s.steps, batch_size=s.batch_size, seed=s.seed, device=device, amp=False,
                      optim=OptimConfig(lr=s.lr, clip_lr_coef=s.clip_lr_coef, weight_decay=s.weight_decay, warmup=s.warmup),
                      log_every=s.log_every, val_every=s.val_every, progress=s.progress)
    log(f"training: {s.steps} steps (validation every {s.val_every})" if s.val_every else
        f"training: {s.steps} steps")
    started = time.monotonic()
    history = fit(task, train, loop, out, val_dataset=test, sampler=sampler)
    train_seconds = time.monotonic() - started
    log(f"held-out captions and QA of {len(test_v)} videos (PyTorch greedy)")
    vals = [r for r in history if r.get("kind") == "val"]
    final = vals[-1] if vals else {}

    # final figures on the trained side: captions + QA of the held-out split (PyTorch greedy)
    sides = side_arrays(model, test.frames, test.frame_mask)
    decoder.eval()
    held = evaluate(decoder, sides, test_v, vocab, tokenizer, vocabulary)
    qa = qa_accuracy(decoder, sides, test_v, vocab, tokenizer) if s.qa else None
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}
    summary = {"schema": "hbi.train-caption-joint/1", "settings": settings, "train_seconds": train_seconds,
               "final": str(out / "final"), "decoder": str(out / DECODER_DIR),
               "test_t2v_r1": final.get("t2v_r1"), "test_attribute_accuracy": held["attribute_accuracy"],
               "train_attribute_accuracy": final.get("train_attribute_accuracy"), "qa": qa,
               "validations": vals, "test_videos": len(test_v),
               "decoder_parameters": sum(p.numel() for p in decoder.parameters())}
    save_decoder(decoder, out / DECODER_DIR, extra={"training": {
        k: summary[k] for k in ("settings", "train_seconds", "test_attribute_accuracy", "test_videos")}})
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "test_captions.json").write_text(json.dumps(
        [{"video": v["file"], "caption": c, "reference": v["captions"][0], "match": h}
         for v, c, h in zip(test_v, held["captions"], held["hits"])], indent=1) + "\n")
    log(f"done in {train_seconds:.0f} s: held-out t2v R@1 {summary['test_t2v_r1']}, attribute accuracy "
        f"{100 * held['attribute_accuracy']:.1f} %" + (f", QA exact match {100 * qa['exact_match']:.1f} %" if qa else ""))
    return summary


# ---------------------------------------------------------------------------------------------------------------
# artifacts: retrieval package + caption package, laid out like hbi_runtime/data/demo


def runtime_caption_figures(caption_dir: Path, data_dir: Path, max_length: int = 40) -> dict[str, Any]:
    """Held-out figures of a caption package through the torch-free runtime (ONNX Runtime, greedy): attribute
    accuracy, BLEU-4 / ROUGE-L / CIDEr-D against the canonical captions, open-ended QA exact match."""
    from hbi_runtime.tasks.caption import load_caption
    from hbi_runtime.tasks.generate import SearchOptions
    from hbi_runtime.tasks.metrics import caption_metrics
    from hbi_training.caption import attribute_match, read_splits

    vocabulary, _, test = read_splits(data_dir)
    options = SearchOptions(max_length=max_length)
    with load_caption(caption_dir) as model:
        videos, _, errors = model.encode_videos([str(Path(data_dir) / v["file"]) for v in test], workers=1)
        if errors:
            raise errors[0]
        results = model.caption_side(videos, [v["file"] for v in test], options=options)
        rows = [(i, q, a) for i, v in enumerate(test) for q, a in qa_pairs(v["scene"])]
        pick = [r[0] for r in rows]
        answers = model.caption_side(videos.take(pick), [test[i]["file"] for i in pick], [r[1] for r in rows],
                                     options)
        caption_sha = model.manifest.sha256
    hits = [attribute_match(r.text, v["scene"], vocabulary) for r, v in zip(results, test)]
    return {"videos": len(test), "attribute_accuracy": float(np.mean(hits)),
            "metrics": caption_metrics([r.text for r in results], [[v["captions"][0]] for v in test]),
            "qa_exact_match": float(np.mean([r.text == a for (_, _, a), r in zip(rows, answers)])),
            "qa_questions": len(rows), "caption_package_sha256": caption_sha,
            "captions": [{"video": v["file"], "caption": r.text, "match": h} for v, r, h in zip(test, results, hits)]}


def joint_history(summary: dict[str, Any]) -> list[str]:
    """README lines saying how a single joint run trained (the default history of :func:`write_joint_artifacts`)."""
    s = summary["settings"]
    start = f"from {s['init']}" if s.get("init") else f"from a random '{s['model_preset']}' model"
    return [f"Trained jointly with the caption decoder (hbi_training.joint) {start}: {s['steps']} steps, batch "
            f"{s['batch_size']}, lr {s['lr']}, caption weight {s['caption_weight']}, per-frame aux weight "
            f"{s['aux_weight']}, token dropout {s['token_dropout']}; {summary['train_seconds']:.0f} s on "
            f"{s.get('device', 'cpu')}."]


def caption_readme(history: list[str], decoder: dict[str, Any], figures: dict[str, Any], command: str) -> str:
    m = figures["metrics"]
    grid = decoder.get("patch_grid") or 0
    decoder_line = (f"Decoder: width {decoder['width']}, {decoder['layers']} layers, {decoder['heads']} heads, "
                    f"frame-difference memory tokens {'on' if decoder.get('frame_deltas') else 'off'}, spatial "
                    + (f"memory {grid} x {grid} per frame" if grid else "memory off")
                    + f", {decoder['parameters'] / 1000:.0f} k trained parameters"
                    + (f" + {decoder['frozen_parameters'] / 1000:.0f} k frozen (the tower copy)."
                       if decoder.get("frozen_parameters") else "."))
    reads = ("It reads the video side of the demo retrieval package (../package, referenced by its manifest_sha256 "
             "in\nmanifest.json; its video_encoder.onnx is reused)")
    reads += (", and each frame's patch map through frame_patches.onnx (a frozen\ncopy of that tower's blocks but "
              "the last, run on the same decoded frames)." if grid else ".")
    return "\n".join([
        "caption/: the demo caption / open-ended QA decoder (a caption package).",
        "",
        reads + " Design: docs/captioning.md.",
        "",
        "How the retrieval model and this decoder were trained:",
        *(f"    {line}" for line in history),
        "",
        "Regenerate (with the retrieval package, the checkpoint and the samples):",
        f"    {command}",
        "",
        decoder_line,
        "",
        f"Held-out ({figures['videos']} test videos, greedy, this package through hbi_runtime):",
        f"    BLEU-4 {m['bleu4']:.3f}   ROUGE-L {m['rouge_l']:.3f}   CIDEr-D {m['cider_d']:.2f}   "
        "(METEOR: not available offline)",
        f"    every attribute (colours, shapes, motions, order of events) named: "
        f"{100 * figures['attribute_accuracy']:.1f} % of videos (goal: 80 %)",
        f"    open-ended QA exact match {100 * figures['qa_exact_match']:.1f} % of {figures['qa_questions']} questions",
        "",
    ])


def write_joint_artifacts(run: Path, dest: Path, data_dir: Path, *, seed: int = 0,
                          progress: Callable[[str], None] | None = None, decoder_stage: dict[str, Any] | None = None,
                          decoder_data: Path | None = None, decoder_run: Path | None = None,
                          history: list[str] | None = None, command: str | None = None,
                          recipe: dict[str, Any] | None = None, overwrite: bool = True) -> dict[str, Any]:
    """A finished joint run -> ``dest`` laid out like ``hbi_runtime/data/demo`` (package/, checkpoint/, samples/,
    queries.json, README.txt from ``hbi_training.demo.build_artifacts``; caption/ from ``export_run``, with its
    README.txt). Returns the report (retrieval + runtime caption figures).

    ``dest`` follows :func:`hbi_runtime.outputs.prepare_output_dir` (kind ``demo artifact folder``: an earlier
    artifact folder is replaced, never the run, the data sets or a folder of other files). Everything is built in a
    temporary sibling folder that replaces ``dest`` only when complete: a failure (an export, the decoder stage, a
    parity check) leaves the previous artifacts as they were.

    ``decoder_stage``: settings of ``hbi_training.caption.CaptionTrainSettings`` (not the folders): after the
    retrieval package is written, a decoder trains alone on its frozen video side (``train_caption``, run folder
    ``RUN/decoder-stage``, reading the package and checkpoint of the folder being built, recorded under their
    final names ``dest/package``, ``dest/checkpoint``) and that decoder is shipped instead of the run's;
    ``decoder_data``: the synthetic set it trains on (default ``data_dir``; a larger set of the same seed has the
    same held-out triples and test videos, ``hbi_training.data.scenes.plan_split``). ``decoder_run``: instead, ship
    the decoder of this finished ``hbi-train caption`` run folder (trained on the side of an identical export of
    this run's model). ``history``: README lines saying how the model was trained (default: :func:`joint_history`
    of the run); ``command``: the regenerate command; ``recipe``: the caption recipe to name in README.txt
    (``hbi_training.demo.CaptionDemoRecipe``).

    Raises:
        UsageError: ``dest`` may not be written (see above). HbiError: a package failed its parity check.
    """
    from hbi_runtime.outputs import prepare_output_dir, staged_output_dir

    run, dest = Path(run), Path(dest)
    dest = prepare_output_dir(dest, kind="demo artifact folder", inputs=[run, data_dir, decoder_data, decoder_run],
                              overwrite=overwrite)
    with staged_output_dir(dest) as tmp:
        report = _build_joint_artifacts(run, tmp, dest, Path(data_dir), seed=seed, log=_log_to(progress),
                                        decoder_stage=decoder_stage, decoder_data=decoder_data,
                                        decoder_run=decoder_run, history=history, command=command, recipe=recipe)
    return report


def _build_joint_artifacts(run: Path, dest: Path, final: Path, data_dir: Path, *, seed: int,
                           log: Callable[[str], None], decoder_stage: dict[str, Any] | None,
                           decoder_data: Path | None, decoder_run: Path | None, history: list[str] | None,
                           command: str | None, recipe: dict[str, Any] | None) -> dict[str, Any]:
    """:func:`write_joint_artifacts`' work, in the empty folder ``dest`` that becomes ``final`` when complete."""
    from hbi_training.caption import CaptionTrainSettings, export_run, train_caption
    from hbi_training.demo import DemoRecipe, build_artifacts, pick_samples, readme

    summary = json.loads((run / "summary.json").read_text())
    command = command or JOINT_COMMAND.format(seed=seed)
    history = list(history or joint_history(summary))
    log("retrieval package, checkpoint, samples and queries")
    report, _ = build_artifacts(dest, data=data_dir, final=run / "final", recipe=DemoRecipe(), seed=seed,
                                summary={"validation": {"t2v_r1": summary["test_t2v_r1"]},
                                         "train_seconds": summary["train_seconds"]},
                                ablation=None, joint={"command": command, "history": history, "recipe": recipe},
                                log=log)
    log(f"retrieval package: t2v R@1 {100 * report['package_t2v_r1']:.1f} %, queries "
        f"{report['queries_first']}/{report['queries']}")
    decoder_dir = run / DECODER_DIR
    if decoder_stage is not None or decoder_run is not None:
        if decoder_run is not None:
            stage = json.loads((Path(decoder_run) / "summary.json").read_text())
            stage["decoder"] = str(Path(decoder_run) / DECODER_DIR)
        else:
            extra = {"checkpoint": dest / "checkpoint"} if decoder_stage.get("patch_grid") else {}
            stage = train_caption(CaptionTrainSettings(data_dir=Path(decoder_data or data_dir),
                                                       out_dir=run / "decoder-stage", package=dest / "package",
                                                       recorded_as=(dest, final), **decoder_stage, **extra),
                                  progress=log)
        decoder_dir = Path(stage["decoder"])
        st = stage["settings"]
        history.append(f"Then the caption decoder alone, new, on the frozen video side of that package "
                       f"(hbi-train caption) over {stage['train_videos']} train videos: {st['steps']} steps, "
                       f"batch {st['batch_size']}, lr {st['lr']}, token "
                       f"dropout {st['token_dropout']}, frame-difference tokens {'on' if st['frame_deltas'] else 'off'}"
                       + (f", spatial memory ({st['patch_grid']} x {st['patch_grid']} patch map per frame)"
                          if st.get("patch_grid") else "")
                       + f"; {stage['train_seconds']:.0f} s on cpu.")
        report["joint"] = {**report["joint"], "history": history}  # README.txt names the decoder stage too
        (dest / "README.txt").write_text(readme(report, pick_samples(data_dir, DemoRecipe().n_samples, seed)))
    manifest = export_run(decoder_dir, dest / "package", dest / "caption", data_dir, overwrite=False, progress=log)
    if manifest["status"] != "verified":
        from hbi_runtime.errors import HbiError

        raise HbiError("the caption package failed its parity check; no artifacts written",
                       hint="export the decoder alone to read the parity report: `hbi-export caption-export "
                            f"--decoder {decoder_dir} --model PKG --out DIR`")
    log("caption figures of the package on the held-out videos, through the runtime")
    figures = runtime_caption_figures(dest / "caption", data_dir)
    from hbi_export.tasks.decoder import load_decoder

    decoder, _ = load_decoder(decoder_dir)
    info = {**decoder.config.to_dict(), "parameters": sum(p.numel() for p in decoder.parameters() if p.requires_grad),
            "frozen_parameters": sum(p.numel() for p in decoder.parameters() if not p.requires_grad)}
    (dest / "caption" / "README.txt").write_text(caption_readme(history, info, figures, command))
    log(f"caption package: held-out attribute accuracy {100 * figures['attribute_accuracy']:.1f} % (runtime), "
        f"QA exact match {100 * figures['qa_exact_match']:.1f} %")
    from hbi_training.demo import folder_size

    report.update(caption=figures, bytes=folder_size(dest), history=history)
    return report


JOINT_COMMAND = "python -m hbi_training.demo --out DIR --seed {seed} --caption-joint"
