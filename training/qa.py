"""The QA demo: questions with answers from the synthetic scenes, and a small QA model trained on them on CPU.

Questions (:func:`scene_questions`) come from the scene metadata, one-word answers as in MSRVTT-QA: the colour
of a shape (``what colour is the square?``; for a turn ``what colour does the cross turn?``), what a shape does
(``what does the red circle do?`` -> ``left`` / ``appear`` / ``turn`` ...), which shape did an event (asked only
when the event is unique in the scene), the order (``what happens first?`` / ``what happens last?``, ``which
shape acts first?``) and the count (``how many shapes are there?`` -> ``two`` / ``three``). The answer vocabulary
(:data:`ANSWERS`, 17 answers) is stored in the package as ``answers.json`` (the official ``train_ans2label.json``
layout). Test videos each contain a (colour, shape, action) combination never seen in training.

The demo model (:func:`demo_config`) is the official QA model's structure on the retrieval demo's sizes (D = 64,
32 x 32 frames, T = 8, L = 16) with smaller answer heads (P = 64, hidden 128) and an 8-wide question tower (the
49408-row CLIP embedding table would dominate the package otherwise). Its video side starts from the trained
retrieval demo checkpoint (``hbi_runtime/data/demo/checkpoint``); everything trains with the official objective's
per-level cross-entropy, one batch = every question of ``videos_per_step`` videos (each video encoded once per
step). The result is exported as a QA package (parity-checked) and its accuracy measured through the runtime on
the held-out test videos.

::

    hbi-train qa demo --data DIR --out RUN_DIR [--artifacts hbi_runtime/data/demo/qa]
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import hbi_runtime
from hbi_runtime.errors import HbiError, UsageError
from hbi_training.data.scenes import ACTIONS, COLOURS, MOVES, SHAPES, Scene

DEMO_DIR = Path(hbi_runtime.__file__).resolve().parent / "data" / "demo"
QA_DEMO_DIR = DEMO_DIR / "qa"
COUNTS = {2: "two", 3: "three"}
ANSWERS: tuple[str, ...] = (*COLOURS, *SHAPES, *ACTIONS, *COUNTS.values())
ORDINALS = ("first", "second", "third")
SIZE_LIMIT = 5 * 2**20
MAX_WORDS, MAX_FRAMES = 16, 8


def _verb(event) -> str:
    if event.action in MOVES:
        return f"moves {event.action}"
    if event.action == "turn":
        return f"turns {event.colour_to}"
    return f"{event.action}s"


def scene_questions(scene: Scene) -> list[tuple[str, str, str]]:
    """``(question, answer, kind)`` for one scene, deterministic, every answer in :data:`ANSWERS`."""
    out = []
    events = list(scene.events)
    by_phrase: dict[str, int] = {}
    for e in events:
        by_phrase[_verb(e)] = by_phrase.get(_verb(e), 0) + 1
    for e in events:
        obj = scene.objects[e.obj]
        if e.action == "turn":
            out.append((f"what colour does the {obj.shape} turn?", e.colour_to, "colour"))
            out.append((f"what colour is the {obj.shape} at first?", obj.colour, "colour"))
        else:
            out.append((f"what colour is the {obj.shape}?", obj.colour, "colour"))
        out.append((f"what does the {obj.colour} {obj.shape} do?", e.action, "action"))
        if by_phrase[_verb(e)] == 1:
            out.append((f"which shape {_verb(e)}?", obj.shape, "shape"))
    out.append(("what happens first?", events[0].action, "order"))
    out.append(("what happens last?", events[-1].action, "order"))
    out.append(("which shape acts first?", scene.objects[events[0].obj].shape, "order"))
    out.append(("how many shapes are there?", COUNTS[len(scene.objects)], "count"))
    return out


def question_rows(data: Path, split: str) -> list[dict]:
    """Every question of a split: ``{"video_row", "file", "question", "answer", "kind"}`` in manifest order."""
    from hbi_training.data import read_manifest

    videos = [v for v in read_manifest(data)["videos"] if v["split"] == split]
    return [{"video_row": i, "file": v["file"], "question": q, "answer": a, "kind": k}
            for i, v in enumerate(videos) for q, a, k in scene_questions(Scene.from_dict(v["scene"]))]


def write_sample_questions(data: Path, samples: Path, out: Path) -> int:
    """The questions of the shipped sample videos (``samples/*.mp4``, test videos of the set) with answers, video
    paths relative to ``out``'s folder (``../samples/<name>``)."""
    names = {p.name for p in Path(samples).glob("*.mp4")}
    rows = [r for r in question_rows(data, "test") if Path(r["file"]).name in names]
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video", "question", "answer"])
        for r in rows:
            writer.writerow([f"../samples/{Path(r['file']).name}", r["question"], r["answer"]])
    return len(rows)


def write_questions_csv(data: Path, split: str, out: Path) -> int:
    """``video,question,answer`` rows (video paths relative to ``out``'s folder) for ``hbi-run qa --questions``."""
    rows = question_rows(data, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video", "question", "answer"])
        for r in rows:
            writer.writerow([str((Path(data) / r["file"]).resolve()), r["question"], r["answer"]])
    return len(rows)


# ---------------------------------------------------------------------------------------------------- model

def demo_config():
    """The demo QA model's config: the retrieval demo's encoders, an 8-wide question tower, small heads."""
    from hbi_export.model.config import TextConfig
    from hbi_export.tasks.qa import OFFICIAL_TEXT_RATIOS, OFFICIAL_VIDEO_RATIOS, QAConfig
    from hbi_training.runs import preset_config

    base = preset_config("demo")
    model = base.__class__.from_dict({**base.to_dict(), "text_ratios": list(OFFICIAL_TEXT_RATIOS),
                                      "video_ratios": list(OFFICIAL_VIDEO_RATIOS)})
    text = TextConfig(width=8, layers=2, heads=2, context_length=MAX_WORDS, vocab_size=49408)
    from dataclasses import replace

    return QAConfig(model=replace(model, text=text), answers=len(ANSWERS), proj_dim=64, hidden_dim=128)


VIDEO_PREFIXES = ("clip.visual.", "frame_position_embeddings.", "transformerClip.", "v_ctm", "v_block",
                  "video_weight_fc")


def init_from_retrieval(model, checkpoint: Path) -> int:
    """Copy the video side (and every other same-named, same-shaped tensor) from a retrieval checkpoint."""
    import torch

    from hbi_export.checkpoints import load_checkpoint

    state, _, _ = load_checkpoint(checkpoint)
    own = model.state_dict()
    copied = {k: v for k, v in state.items() if k.startswith(VIDEO_PREFIXES) and k in own
              and own[k].shape == v.shape}
    with torch.no_grad():
        for k, v in copied.items():
            own[k].copy_(v)
    return len(copied)


@dataclass(frozen=True)
class QARecipe:
    steps: int = 3000
    videos_per_step: int = 32  # every question of these videos (~11 each) makes one batch
    lr: float = 3e-3
    weight_decay: float = 0.01
    threads: int = 1
    val_every: int = 150


def _log(message: str) -> None:
    print(f"[qa {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def train_demo(data: Path, run_dir: Path, recipe: QARecipe = QARecipe(), seed: int = 0,
               init: Path = DEMO_DIR / "checkpoint", *, log: Callable[[str], None] | None = None,
               bar: bool = False) -> tuple[Any, dict]:
    """Train the demo QA model; returns (model, summary) and saves it under ``run_dir/final``.

    ``log``: told each stage as it starts and each validation (default: stderr lines); ``bar``: a step bar
    (:class:`~hbi_training.progress.ProgressBar`, on a terminal) shows the loss and validations instead."""
    import torch
    import torch.nn.functional as F

    from hbi_export.tasks.qa import QAModel
    from hbi_export.tasks.qa_checkpoint import save_qa_model
    from hbi_runtime.tokenizer import ClipTokenizer
    from hbi_training.data import frame_cache
    from hbi_training.progress import ProgressBar

    log = log or _log
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(seed)
    config = demo_config()
    model = QAModel(config)
    copied = init_from_retrieval(model, init)
    log(f"video side: {copied} tensors from {init}")
    tok = ClipTokenizer(max_words=MAX_WORDS)
    label = {a: i for i, a in enumerate(ANSWERS)}
    splits = {}
    log("data: frames and questions of both splits (the videos are decoded on first use)")
    for split in ("train", "test"):
        frames, mask = frame_cache(data, split, max_frames=MAX_FRAMES, image_size=config.model.vision.image_size)
        rows = question_rows(data, split)
        ids, tmask, truncated = tok([r["question"] for r in rows])
        if any(truncated):
            raise UsageError(f"a question is longer than {MAX_WORDS} tokens")
        video = np.array([r["video_row"] for r in rows])
        splits[split] = dict(ids=torch.from_numpy(ids), mask=torch.from_numpy(tmask), video=video,
                             y=torch.tensor([label[r["answer"]] for r in rows]), frames=frames,
                             fmask=torch.from_numpy(mask), kind=[r["kind"] for r in rows],
                             by_video=[np.flatnonzero(video == i) for i in range(len(mask))])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)

    def level_logits(s, videos: np.ndarray):
        """Logits (3, n, A) of every question of ``videos`` (sorted), and their question indices."""
        idx = np.concatenate([s["by_video"][v] for v in videos])
        position = {v: i for i, v in enumerate(videos)}
        vec = model.encode_video_qa(torch.from_numpy(np.array(s["frames"][videos])), s["fmask"][videos])
        take = torch.tensor([position[v] for v in s["video"][idx]])
        q = model.encode_question(s["ids"][idx], s["mask"][idx])
        return model.level_logits(q, tuple(v[take] for v in vec)), torch.from_numpy(idx)

    def evaluate(s) -> dict:
        model.eval()
        hit = np.zeros(len(s["y"]), dtype=bool)
        with torch.no_grad():
            for a in range(0, len(s["by_video"]), 128):
                logits, idx = level_logits(s, np.arange(a, min(a + 128, len(s["by_video"]))))
                combined = torch.einsum("l,lba->ba", torch.tensor(config.answer_weights), logits)
                hit[idx.numpy()] = (combined.argmax(-1) == s["y"][idx]).numpy()
        kinds = sorted(set(s["kind"]))
        return {"top1": float(hit.mean()),
                "by_kind": {k: float(hit[[i for i, x in enumerate(s["kind"]) if x == k]].mean()) for k in kinds}}

    rng = np.random.default_rng(seed)
    train, history = splits["train"], []
    log(f"training: {recipe.steps} steps (validation every {recipe.val_every})")
    steps_bar = ProgressBar(recipe.steps, 0, "qa", enabled=bar)
    t0 = time.monotonic()
    for step in range(1, recipe.steps + 1):
        model.train()
        videos = np.sort(rng.choice(len(train["by_video"]), recipe.videos_per_step, replace=False))
        logits, idx = level_logits(train, videos)
        loss = sum(F.cross_entropy(lv, train["y"][idx]) for lv in logits)  # official: CE at every level
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % recipe.val_every == 0 or step == recipe.steps:
            val = evaluate(splits["test"])
            history.append({"step": step, "loss": loss.item(), "test_top1": val["top1"]})
            if not steps_bar.enabled:
                log(f"step {step}: loss {loss.item():.3f}, held-out top-1 {100 * val['top1']:.1f} % "
                    f"({time.monotonic() - t0:.0f} s) {val['by_kind']}")
        seen = f", held-out top-1 {100 * history[-1]['test_top1']:.1f} %" if history else ""
        steps_bar.update(step, f"loss {loss.item():.3f}{seen}")
    steps_bar.close()
    log("final weights and accuracy")
    model.eval()
    final = save_qa_model(model, run_dir / "final")
    (final / "answers.json").write_text(json.dumps({a: i for i, a in enumerate(ANSWERS)}, indent=1) + "\n")
    summary = {"schema": "hbi.train-qa/1", "recipe": asdict(recipe), "seed": seed, "final": str(final),
               "train_seconds": time.monotonic() - t0, "train_questions": len(train["y"]),
               "test": evaluate(splits["test"]), "train_top1": evaluate(train)["top1"], "history": history}
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return model, summary


def run_demo(data: Path, out: Path, *, artifacts: Path = QA_DEMO_DIR, recipe: QARecipe = QARecipe(),
             seed: int = 0, n_train: int = 2400, n_test: int = 120, trained: Path | None = None,
             progress: Callable[[str], None] | None = None, bar: bool = False) -> dict:
    """Data (reused when present), training, package export + parity, accuracy through the runtime, artifacts.

    ``trained``: a finished run folder (``final/`` and ``summary.json`` written by :func:`train_demo`), exported and
    evaluated instead of training again (the same seed and recipe give the same weights).

    ``artifacts`` follows :func:`hbi_runtime.outputs.prepare_output_dir` (kind ``QA demo folder``: an earlier QA demo
    folder is replaced; never the data set, the run folders, the retrieval demo's checkpoint and samples it reads,
    nor a folder of other files); it is checked before anything is rendered or trained, and replaced only once
    the new folder is complete.

    ``progress``: told each stage as it starts (default: stderr lines); ``bar``: a step bar while training (see
    :func:`train_demo`).

    Raises:
        UsageError: ``artifacts`` may not be written. HbiError: the package failed its parity check or is too large.
    """
    from hbi_export.tasks.qa_checkpoint import build_qa_model
    from hbi_runtime.outputs import prepare_output_dir, staged_output_dir
    from hbi_training.data import generate

    inputs = [data, out, trained, DEMO_DIR / "samples", DEMO_DIR / "checkpoint" if trained is None else None]
    artifacts = prepare_output_dir(artifacts, kind="QA demo folder", inputs=inputs, overwrite=True,
                                   option="--artifacts")
    log = progress or _log
    log(f"data: {n_train} + {n_test} videos in {data} (rendered unless already there)")
    paths = generate(data, n_train, n_test, seed)
    if trained is not None:
        log(f"model: {Path(trained) / 'final'}")
        model = build_qa_model(Path(trained) / "final")[0]
        summary = json.loads((Path(trained) / "summary.json").read_text())
    else:
        model, summary = train_demo(paths.root, Path(out), recipe, seed, log=log, bar=bar)
    # again: training took minutes, and whatever `artifacts` holds when the new folder is swapped in goes
    prepare_output_dir(artifacts, kind="QA demo folder", inputs=inputs, overwrite=True, option="--artifacts")
    with staged_output_dir(artifacts) as tmp:
        report = build_qa_artifacts(tmp, model, summary, data_root=paths.root, data=data, out=Path(out), log=log)
    (Path(out) / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def build_qa_artifacts(tmp: Path, model, summary: dict, *, data_root: Path, data: Path, out: Path,
                       log: Callable[[str], None] | None = None) -> dict:
    """:func:`run_demo`'s artifacts, written into the empty folder ``tmp``: the QA package (parity-checked), its
    accuracy through the runtime on the held-out questions (``out/test_questions.csv``) and on the demo samples
    (``questions.csv``), README.txt. Returns the report.

    Raises:
        HbiError: the package failed its parity check, or the folder is larger than ``SIZE_LIMIT``.
    """
    from hbi_export.tasks.qa_export import export_qa_model
    from hbi_runtime.tasks.qa import accuracy, load_qa

    log = log or _log
    log("QA package: export and parity check")
    _, parity = export_qa_model(model, tmp / "package", answers=ANSWERS, max_words=MAX_WORDS, max_frames=MAX_FRAMES,
                                source={"checkpoint": "hbi-train qa demo", "format": "hbi-toolkit-qa", "sha256": None},
                                progress=lambda m: log(f"export: {m}"))
    if not parity.ok:
        raise HbiError("the exported QA package failed its parity check")
    log("held-out questions through the runtime")
    n = write_questions_csv(data_root, "test", out / "test_questions.csv")
    with load_qa(tmp / "package") as qa, open(out / "test_questions.csv", newline="") as fh:
        result = qa.ask([(r["video"], r["question"], r["answer"]) for r in csv.DictReader(fh)], top_k=5, workers=1)
        acc = accuracy(result.rows, qa.answers)
    log(f"package: held-out top-1 {100 * acc['top1']:.1f} %, top-5 {100 * acc['top5']:.1f} % over {n} "
         "questions (through hbi_runtime)")
    log("questions of the demo sample videos through the runtime")
    n_samples = write_sample_questions(data_root, DEMO_DIR / "samples", tmp / "questions.csv")
    with open(tmp / "questions.csv", newline="") as fh:  # its paths are relative to the installed qa/ folder
        sample_rows = [(str(DEMO_DIR / "samples" / Path(r["video"]).name), r["question"], r["answer"])
                       for r in csv.DictReader(fh)]
    with load_qa(tmp / "package") as qa:
        sample_acc = accuracy(qa.ask(sample_rows, workers=1).rows, qa.answers)
    report = {k: v for k, v in summary.items() if k != "history"}
    report["samples_accuracy"] = sample_acc
    log(f"sample videos: top-1 {100 * sample_acc['top1']:.1f} % over {n_samples} questions")
    report.update(package_accuracy=acc, failed=len(result.failed), questions=n,
                  command=f"hbi-train qa demo --data {data} --out {out}")
    (tmp / "README.txt").write_text(_readme(report))
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    report["bytes"] = size
    if size > SIZE_LIMIT:
        raise HbiError(f"the QA demo artifacts take {size / 2**20:.2f} MiB, more than {SIZE_LIMIT / 2**20:.0f} MiB")
    return report


def _readme(r: dict) -> str:
    acc = r["package_accuracy"]
    kinds = ", ".join(f"{k} {100 * v:.1f} %" for k, v in r["test"]["by_kind"].items())
    return "\n".join([
        "hbi_runtime/data/demo/qa: a small video-QA model (official HBI QA structure) on the synthetic set.",
        "",
        "Regenerate (writes this folder; DIR is the synthetic set of `python -m hbi_training.demo`, seed 0,",
        "2400 + 120 videos, rendered when missing):",
        "    hbi-train qa demo --data DIR --out RUN_DIR",
        f"This copy: {r['command']}",
        "Video side initialised from the retrieval demo checkpoint (../checkpoint); question tower, merges and",
        "answer heads from scratch; all trained with per-level cross-entropy, recipe "
        + json.dumps(r["recipe"]) + f", seed {r['seed']}.",
        f"Training: {r['train_questions']} questions on 2400 train videos, {r['train_seconds']:.0f} s on CPU.",
        f"Answers: {len(ANSWERS)} ({', '.join(ANSWERS)}), package/answers.json.",
        "",
        f"Held-out test (120 videos with unseen colour-shape-action combinations, {acc['questions']} questions):",
        f"    top-1 {100 * acc['top1']:.1f} %, top-5 {100 * acc['top5']:.1f} % (this package through hbi_runtime)",
        f"    top-1 {100 * r['test']['top1']:.1f} % (the PyTorch model; per question kind: {kinds})",
        f"    train top-1 {100 * r['train_top1']:.1f} %",
        "",
        f"questions.csv: the {r['samples_accuracy']['questions']} questions of the sample videos "
        f"(../samples), top-1 {100 * r['samples_accuracy']['top1']:.1f} % with this package:",
        "    hbi-run qa --questions hbi_runtime/data/demo/qa/questions.csv",
        "Try: hbi-run qa hbi_runtime/data/demo/samples/test_00063.mp4 \"what colour is the triangle?\"",
        "",
    ])
