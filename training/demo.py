"""The synthetic-data demo: train a small HBI model from scratch on CPU and write the artifacts the runtime ships.

::

    python -m hbi_training.demo --out /tmp/hbi-demo --seed 0

1. renders the synthetic video-caption set (``hbi_training.data.synthetic``: 2400 train videos, 120 held-out test
   videos whose captions contain (colour, shape, action) combinations that never occur in train) and decodes it
   once into the frame caches;
2. pre-trains the Banzhaf estimator on the frozen *initial* model (as the official recipe trains it on the
   frozen CLIP it then fine-tunes from), then trains the ``demo`` model preset (``hbi_training.runs``) with the
   full HBI objective: InfoNCE at the entity, action and event levels, Banzhaf KL, self-distillation;
3. exports the model package (``hbi_export.onnx.package.export_package``: max_words 32, max_frames 8, parity
   checked) and measures text-to-video R@1 of the *package* through the runtime (``hbi_runtime.load``) over
   the whole test gallery;
4. writes ``hbi_runtime/data/demo/`` (or ``--artifacts``): ``package/``, ``checkpoint/`` (the trained model,
   ``model.safetensors`` + ``config.json``), ``samples/`` (a few test videos), ``queries.json`` (example queries,
   each with the sample it should retrieve first; checked here through index + search) and ``README.txt``.

Everything follows from ``--seed``: data, initialisation, data order, Monte-Carlo labels. Training runs on one
thread by default (``--threads``): on a busy 2-core machine two threads fight other processes for the cores and
a step can become ten times slower; one thread is nearly as fast when idle and keeps results reproducible.

``--ablation`` additionally trains the plain-WTI baseline (entity level only, no Banzhaf KL, no
self-distillation) on the same data, model and number of steps, and reports its R@1 beside the full model's.

``--caption-joint`` is what the shipped demo comes from (:class:`CaptionDemoRecipe`, :func:`caption_demo`): step 2
becomes the estimator + two stages of ``hbi_training.joint`` (the retrieval model trains from scratch *with* the
caption decoder and the per-frame attribute / event loss), then a new decoder with frame-difference tokens and
a spatial memory (patch maps from the exported checkpoint's tower) trains alone on the exported package's frozen
video side over a larger set of the same seed (20000 train videos, same held-out triples and test videos), and
``caption/`` ships beside the retrieval package. It wants a
GPU (``--device``, default auto): the shipped run took about 6 minutes of training on one H200, where one CPU
thread would take hours; the decoder stage and the exports run on the CPU.

The checkpoint and the package are fp32 (``DemoRecipe.precision``). The ``demo`` preset's text tower is 32 wide
because CLIP's token-embedding table (49408 rows) dominates the size: at width 64 (3.6 M parameters) fp32 copies
of both exceed the 28 MiB the demo may take, and an fp16 package of the HBI-trained model fails parity (its
action / event text tokens come from DPC-kNN clustering, whose discrete assignments flip under fp16 rounding:
cosine 0.988 < 0.999). R@1 is measured on exactly what is shipped (the package, through the runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

import hbi_runtime
from hbi_runtime.errors import HbiError, UsageError

DEMO_DIR = Path(hbi_runtime.__file__).resolve().parent / "data" / "demo"
COMMAND = "python -m hbi_training.demo --out DIR --seed {seed}"
MAX_WORDS, MAX_FRAMES = 32, 8
SIZE_LIMIT = 28 * 2**20  # bytes the artifacts may take
FIT_FIELDS = ("steps", "batch_size", "recipe", "lr")  # DemoRecipe fields the retrieval fit alone uses


@dataclass(frozen=True)
class DemoRecipe:
    """Everything the demo's result depends on, besides the seed."""

    n_train: int = 2400  # train videos (8 captions each: canonical + paraphrases)
    n_test: int = 120  # held-out gallery; every test video has an unseen (colour, shape, action) combination
    model_preset: str = "demo"  # hbi_training.runs.preset_config
    steps: int = 1300
    batch_size: int = 64  # InfoNCE negatives: 63 per pair
    recipe: str = "scratch"  # optimiser preset: every part at the full rate, weight decay 0.05, 10 % warmup
    lr: float = 1e-3
    banzhaf: bool = True
    hierarchy: bool = True
    estimator_steps: int = 20
    estimator_batch: int = 32
    estimator_samples: int = 20  # Monte-Carlo samples per cell of the estimator's labels
    precision: str = "fp32"  # of the shipped checkpoint and package encoders ("fp16" halves both)
    n_samples: int = 8  # sample videos shipped with the demo
    threads: int = 1


@dataclass(frozen=True)
class CaptionDemoRecipe:
    """The caption demo (``--caption-joint``): what the shipped retrieval model + caption decoder come from.

    The retrieval model trains *with* the caption decoder from the start (``hbi_training.joint``: the HBI objective
    + the decoder's caption / QA cross entropy through the video side + the per-frame attribute and event loss),
    in two stages (the second restarts the schedule at a lower rate with a new per-frame head), then a new decoder
    with frame-difference memory tokens and a spatial memory (each frame's patch tokens, pooled 4 x 4) trains
    alone on the frozen side of the exported package. The step counts
    are the ones the shipped run used (each stage filled a fixed time on one H200)."""

    stage1_steps: int = 1857
    stage1_lr: float = 1e-3
    stage2_steps: int = 889
    stage2_lr: float = 5e-4
    batch_size: int = 64
    aux_weight: float = 4.0
    token_dropout: float = 0.3
    decoder_steps: int = 10000
    decoder_token_dropout: float = 0.3
    decoder_train_videos: int = 20000  # the decoder stage's set: same seed (same held-out triples and test videos)
    frame_deltas: bool = True
    decoder_patch_grid: int = 4  # the decoder's spatial memory: a 4 x 4 map of patch tokens per frame
    device: str = "auto"  # a GPU takes minutes; one CPU thread, hours


def _log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# data and training


def make_data(root: Path, recipe: DemoRecipe, seed: int) -> Path:
    """Render the set (reused when an identical one is there) and build both frame caches."""
    from hbi_training.data import frame_cache, generate
    from hbi_training.runs import preset_config

    started = time.monotonic()
    paths = generate(root, recipe.n_train, recipe.n_test, seed)
    size = preset_config(recipe.model_preset).vision.image_size
    for split in ("train", "test"):
        frame_cache(paths.root, split, max_frames=MAX_FRAMES, image_size=size)
    _log(f"data: {recipe.n_train} + {recipe.n_test} videos in {paths.root} "
         f"({'reused' if paths.reused else 'rendered'}, {time.monotonic() - started:.0f} s)")
    return paths.root


def train_estimator(data: Path, out: Path, recipe: DemoRecipe, seed: int, progress: bool = False,
                    device: str = "cpu") -> Path:
    """The Banzhaf estimator, pre-trained on the frozen *initial* ``recipe.model_preset`` model; returns ``out``."""
    from hbi_training.estimator import EstimatorConfig
    from hbi_training.runs import EstimatorSettings, run_estimator

    started = time.monotonic()
    run_estimator(EstimatorSettings(
        data_dir=data, out_dir=out, model_preset=recipe.model_preset, seed=seed, device=device, amp=False,
        max_frames=MAX_FRAMES, max_words=MAX_WORDS, progress=progress, steps=recipe.estimator_steps,
        batch_size=recipe.estimator_batch, estimator=EstimatorConfig(samples=recipe.estimator_samples, seed=seed)))
    _log(f"estimator: {recipe.estimator_steps} steps in {time.monotonic() - started:.0f} s")
    return out


def train(data: Path, run_dir: Path, recipe: DemoRecipe, seed: int, progress: bool = False) -> dict[str, Any]:
    """Estimator (when the recipe uses the Banzhaf KL) + fit. Returns the fit summary plus ``train_seconds``."""
    from hbi_training.losses import LossConfig
    from hbi_training.runs import FitSettings, run_fit

    common = dict(data_dir=data, model_preset=recipe.model_preset, seed=seed, device="cpu",
                  max_frames=MAX_FRAMES, max_words=MAX_WORDS, progress=progress)
    started = time.monotonic()
    estimator = train_estimator(data, run_dir / "estimator", recipe, seed, progress) if recipe.banzhaf else None
    summary = run_fit(FitSettings(
        out_dir=run_dir / "fit", steps=recipe.steps, batch_size=recipe.batch_size, recipe=recipe.recipe,
        lr=recipe.lr, loss=LossConfig(banzhaf=recipe.banzhaf, hierarchy=recipe.hierarchy), estimator=estimator,
        **common))
    summary["train_seconds"] = time.monotonic() - started
    _log(f"fit: {recipe.steps} steps, {summary['train_seconds']:.0f} s in all, validation "
         f"t2v R@1 {summary['validation']['t2v_r1']:.1f} %")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# artifacts


def save_checkpoint(final: Path, out: Path, precision: str) -> Path:
    """The trained model folder, its tensors cast to ``precision`` (the loaders cast back to fp32)."""
    import torch

    from hbi_export.checkpoints import load_checkpoint
    from hbi_export.checkpoints.native import save_state_dict

    state, config, _ = load_checkpoint(final)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return save_state_dict(state, config, out)


def package_recall(package: Path, data: Path) -> dict[str, float]:
    """Text-to-video R@1 (and R@5) of the package over the whole test gallery, through the runtime."""
    from hbi_training.data import read_manifest

    videos = [v for v in read_manifest(data)["videos"] if v["split"] == "test"]
    with hbi_runtime.load(package) as model:
        encoded = model.encode_videos([str(data / v["file"]) for v in videos], workers=1)
        if encoded.errors:
            raise encoded.errors[0]
        scores = model.score(model.encode_text([v["captions"][0] for v in videos]), encoded.side)
    truth = np.arange(len(videos))
    rank = (scores > scores[truth, truth][:, None]).sum(axis=1)  # 0 = retrieved first
    return {"t2v_r1": float((rank == 0).mean()), "t2v_r5": float((rank < 5).mean()), "videos": len(videos)}


def pick_samples(data: Path, n: int, seed: int) -> list[dict]:
    """``n`` test videos (seeded choice, test order) with distinct canonical captions."""
    from hbi_training.data import read_manifest

    videos = [v for v in read_manifest(data)["videos"] if v["split"] == "test"]
    order = np.random.default_rng([seed, 7]).permutation(len(videos))
    chosen, captions = [], set()
    for i in order:
        if videos[i]["captions"][0] not in captions:
            chosen.append(int(i))
            captions.add(videos[i]["captions"][0])
        if len(chosen) == n:
            break
    return [videos[i] for i in sorted(chosen)]


def make_queries(samples: list[dict], seed: int) -> list[dict]:
    """Per sample: its canonical caption and one paraphrase (the grammar's), each expecting that sample first."""
    from hbi_training.data.captions import random_caption
    from hbi_training.data.scenes import Scene

    rng = np.random.default_rng([seed, 11])
    queries = []
    for v in samples:
        name = Path(v["file"]).name
        canonical = v["captions"][0]
        paraphrase = canonical
        for _ in range(50):
            paraphrase = random_caption(Scene.from_dict(v["scene"]), rng)
            if paraphrase != canonical:
                break
        queries.append({"query": canonical, "expected": name, "kind": "canonical"})
        if paraphrase != canonical:
            queries.append({"query": paraphrase, "expected": name, "kind": "paraphrase"})
    return queries


def check_queries(package: Path, samples_dir: Path, queries: list[dict]) -> list[dict]:
    """Index the samples, search every query; per query the expected sample's rank and the top hit."""
    from hbi_runtime.index import Index, update_index
    from hbi_runtime.search import search

    with tempfile.TemporaryDirectory() as tmp, hbi_runtime.load(package) as model:
        update_index(model, samples_dir, Path(tmp) / "index", workers=1)
        index = Index.open(Path(tmp) / "index", model_sha256=model.package.manifest_sha256)
        results = search(model, index, [q["query"] for q in queries], top_k=len(index.rows))
    out = []
    for q, result in zip(queries, results):
        names = [Path(h.path).name for h in result.hits]
        out.append({**q, "rank": names.index(q["expected"]) + 1 if q["expected"] in names else None,
                    "top": names[0]})
    return out


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_artifacts(dest: Path, *, data: Path, final: Path, recipe: DemoRecipe, seed: int,
                    summary: dict[str, Any], ablation: dict[str, Any] | None,
                    joint: dict[str, Any] | None = None, overwrite: bool = True) -> dict[str, Any]:
    """Build the artifact folder next to ``dest`` and swap it in; returns the report (also in README.txt).

    ``dest`` follows :func:`hbi_runtime.outputs.prepare_output_dir` (kind ``demo artifact folder``: an earlier demo
    folder is replaced, but never the data set, the checkpoint or a folder of other files), and is replaced only
    once the new folder is complete. ``joint``: the model was trained with the caption decoder
    (``hbi_training.joint``): its ``command`` and ``history`` (README lines), for the README."""
    from hbi_runtime.outputs import prepare_output_dir, staged_output_dir

    dest = prepare_output_dir(dest, kind="demo artifact folder", inputs=[data, final], overwrite=overwrite,
                              option="--artifacts")
    with staged_output_dir(dest) as tmp:
        report, checked = build_artifacts(tmp, data=data, final=final, recipe=recipe, seed=seed, summary=summary,
                                          ablation=ablation, joint=joint)
    for q in checked:
        if q["rank"] != 1:
            _log(f"query {q['query']!r}: {q['expected']} ranked {q['rank']}, first {q['top']}")
    return report


def build_artifacts(tmp: Path, *, data: Path, final: Path, recipe: DemoRecipe, seed: int, summary: dict[str, Any],
                    ablation: dict[str, Any] | None,
                    joint: dict[str, Any] | None = None,
                    log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """:func:`write_artifacts`' work, in the empty folder ``tmp``: (report, the checked queries). ``log``: where
    its messages go (default: stderr lines)."""
    from hbi_export.onnx.package import export_package

    log = log or _log
    save_checkpoint(final, tmp / "checkpoint", recipe.precision)
    cwd = os.getcwd()
    os.chdir(tmp)  # the manifest records the checkpoint path as given: "checkpoint", the folder beside it
    try:
        _, parity = export_package(Path("checkpoint"), Path("package"), max_words=MAX_WORDS,
                                   max_frames=MAX_FRAMES, precision=recipe.precision,
                                   progress=lambda m: log(f"export: {m}"))
    finally:
        os.chdir(cwd)
    if not parity.ok:
        raise HbiError("the exported package failed its parity check; no artifacts written",
                       hint=f"export {final} alone to read the parity report: `hbi-export onnx --checkpoint {final} "
                            f"--out DIR --precision {recipe.precision} --max-words {MAX_WORDS} --max-frames "
                            f"{MAX_FRAMES}`")
    recall = package_recall(tmp / "package", data)
    log(f"package ({recipe.precision}): t2v R@1 {100 * recall['t2v_r1']:.1f} % over {recall['videos']} videos")
    samples = pick_samples(data, recipe.n_samples, seed)
    (tmp / "samples").mkdir()
    for v in samples:
        shutil.copyfile(data / v["file"], tmp / "samples" / Path(v["file"]).name)
    checked = check_queries(tmp / "package", tmp / "samples", make_queries(samples, seed))
    queries = [{"query": q["query"], "expected": q["expected"], "kind": q["kind"]} for q in checked]
    (tmp / "queries.json").write_text(json.dumps({"queries": queries}, indent=1) + "\n")
    report = {
        "command": joint["command"] if joint else COMMAND.format(seed=seed), "seed": seed,
        "recipe": asdict(recipe), "joint": joint,
        "package_t2v_r1": recall["t2v_r1"], "package_t2v_r5": recall["t2v_r5"], "gallery": recall["videos"],
        "validation_t2v_r1": summary["validation"]["t2v_r1"] / 100,
        "train_seconds": summary["train_seconds"],
        "queries_first": sum(q["rank"] == 1 for q in checked), "queries": len(checked),
        "ablation": ablation,
    }
    (tmp / "README.txt").write_text(readme(report, samples))
    size = folder_size(tmp)
    report["bytes"] = size
    if size > SIZE_LIMIT:
        raise HbiError(f"the demo artifacts take {size / 2**20:.1f} MiB, more than {SIZE_LIMIT / 2**20:.0f}")
    return report, checked


def readme(report: dict[str, Any], samples: list[dict]) -> str:
    r = report["recipe"]
    joint = report.get("joint")
    shown = {k: v for k, v in r.items() if not (joint and k in FIT_FIELDS)}
    lines = [
        "hbi_runtime/data/demo: a small HBI model trained from scratch on the synthetic video-caption set.",
        "",
        "Regenerate (writes this folder; the data set and the runs go to DIR):",
        f"    {report['command']}",
        "",
        f"Seed: {report['seed']}. Recipe (hbi_training.demo.DemoRecipe"
        + (", its data / estimator / export part" if joint else "") + f"): {json.dumps(shown)}",
        *([f"Caption recipe (hbi_training.demo.CaptionDemoRecipe): {json.dumps(joint['recipe'])}"]
          if joint and joint.get("recipe") else []),
        "",
        f"Data: {r['n_train']} train videos x 8 captions; {r['n_test']} test videos, each with at least one "
        "(colour, shape, action) combination that never occurs in train.",
        f"Model: preset '{r['model_preset']}' (hbi_training.runs.preset_config), random initialisation.",
        "Objective: " + ("entity/action/event InfoNCE + self-distillation" if r["hierarchy"] else "entity InfoNCE")
        + (" + Banzhaf KL (estimator pre-trained on the frozen initial model)" if r["banzhaf"] else "")
        + (" + the caption decoder's caption / QA cross entropy through the video side + a training-only per-frame "
           "attribute / event loss (caption/README.txt)" if joint else "") + ".",
    ]
    if joint:
        lines += ["How:", *(f"    {line}" for line in joint["history"])]
    else:
        lines.append(f"Training time: {report['train_seconds']:.0f} s on CPU ({r['threads']} thread(s); "
                     "estimator + fit).")
    lines += [
        "",
        f"Text-to-video R@1 over the {report['gallery']} held-out test videos (canonical captions):",
        f"    {100 * report['package_t2v_r1']:.1f} %  (this package, {r['precision']}, through hbi_runtime; "
        f"R@5 {100 * report['package_t2v_r5']:.1f} %)",
        f"    {100 * report['validation_t2v_r1']:.1f} %  (the fp32 model at the end of training)",
    ]
    if report.get("ablation"):
        a = report["ablation"]
        lines.append(f"    {100 * a['validation_t2v_r1']:.1f} %  (ablation: plain WTI, entity level only, no Banzhaf "
                     f"KL, same data, model and steps; {a['train_seconds']:.0f} s)")
    lines += [
        "",
        "Files:",
        "    package/      the model package (hbi_runtime.load), parity-checked against the checkpoint",
        f"    checkpoint/   the trained model (model.safetensors in {r['precision']} + config.json; "
        "hbi_export.checkpoints.build_model)",
        "    samples/      sample test videos (64x64, 8 s, 4 fps, H.264)",
        f"    queries.json  example queries, each with the sample it should retrieve first "
        f"({report['queries_first']} of {report['queries']} do, checked by the demo and tests/training/test_demo.py)",
        *(["    caption/      the caption / open-ended QA decoder trained with this model (caption/README.txt)"]
          if report.get("joint") else []),
        "",
        "Samples (canonical captions):",
        *(f"    {Path(v['file']).name}: {v['captions'][0]}" for v in samples),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the whole demo


def caption_demo(data: Path, out: Path, artifacts: Path, recipe: DemoRecipe, caption: CaptionDemoRecipe,
                 seed: int, progress: bool = False) -> dict[str, Any]:
    """The caption demo (:class:`CaptionDemoRecipe`): estimator, two joint stages, the decoder stage, artifacts."""
    from hbi_training.joint import JointSettings, joint_history, run_joint, write_joint_artifacts
    from hbi_training.runs import resolve_device

    device = resolve_device(caption.device)
    estimator = train_estimator(data, out / "estimator", recipe, seed, progress, device)
    common = dict(data_dir=data, model_preset=recipe.model_preset, estimator=estimator, batch_size=caption.batch_size,
                  aux_weight=caption.aux_weight, token_dropout=caption.token_dropout, device=device, seed=seed,
                  threads=recipe.threads, progress=progress)
    first = run_joint(JointSettings(out_dir=out / "joint1", steps=caption.stage1_steps, lr=caption.stage1_lr,
                                    **common), progress=_log)
    second = run_joint(JointSettings(out_dir=out / "joint2", steps=caption.stage2_steps, lr=caption.stage2_lr,
                                     init=out / "joint1" / "final", init_decoder=out / "joint1" / "decoder", **common),
                       progress=_log)
    history = [f"Banzhaf estimator: {recipe.estimator_steps} steps on the frozen initial model.",
               *joint_history(first), *joint_history(second)]
    decoder_data = data
    if caption.decoder_train_videos != recipe.n_train:
        decoder_data = make_data(out / "data-decoder", replace(recipe, n_train=caption.decoder_train_videos), seed)
    stage = dict(steps=caption.decoder_steps, seed=seed, threads=recipe.threads,
                 token_dropout=caption.decoder_token_dropout, frame_deltas=caption.frame_deltas,
                 patch_grid=caption.decoder_patch_grid)
    return write_joint_artifacts(out / "joint2", artifacts, data, seed=seed, progress=_log, history=history,
                                 recipe=asdict(caption), decoder_data=decoder_data, decoder_stage=stage)


def run_demo(out: Path, seed: int = 0, *, artifacts: Path = DEMO_DIR, recipe: DemoRecipe = DemoRecipe(),
             ablation: bool = False, progress: bool = False, caption_joint: bool = False,
             caption: CaptionDemoRecipe = CaptionDemoRecipe()) -> dict[str, Any]:
    """Data, training (and the ablation), artifacts. Returns the report written to README.txt.

    ``caption_joint``: instead of the retrieval fit, the caption demo (:func:`caption_demo`,
    :class:`CaptionDemoRecipe`): the retrieval model trains with the caption decoder and both ship, the decoder
    as ``caption/`` (``hbi_training.joint.write_joint_artifacts``).

    ``artifacts`` is checked before anything is rendered or trained (:func:`hbi_runtime.outputs.prepare_output_dir`,
    kind ``demo artifact folder``; never the work folder ``out``, what it holds or a folder holding it), and
    replaced only once the new artifacts are complete.

    Raises:
        UsageError: ``artifacts`` may not be written. HbiError: an exported package failed its checks.
    """
    import torch

    from hbi_runtime.outputs import prepare_output_dir

    out = Path(out)
    prepare_output_dir(artifacts, kind="demo artifact folder", inputs=[out], overwrite=True, option="--artifacts")
    torch.set_num_threads(recipe.threads)
    data = make_data(out / "data", recipe, seed)
    if caption_joint:
        report = caption_demo(data, out, artifacts, recipe, caption, seed, progress)
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        return report
    summary = train(data, out / "hbi", recipe, seed, progress)
    base = None
    if ablation:
        plain = replace(recipe, banzhaf=False, hierarchy=False)
        s = train(data, out / "wti", plain, seed, progress)
        base = {"validation_t2v_r1": s["validation"]["t2v_r1"] / 100, "train_seconds": s["train_seconds"],
                "steps": plain.steps}
    report = write_artifacts(artifacts, data=data, final=Path(summary["final"]), recipe=recipe, seed=seed,
                             summary=summary, ablation=base)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hbi_training.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="work folder: data set, runs, report.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifacts", type=Path, default=DEMO_DIR,
                        help=f"where the artifacts go ({DEMO_DIR}); an earlier demo folder there is replaced, any "
                             "other non-empty folder refused")
    parser.add_argument("--ablation", action="store_true", help="also train the plain-WTI baseline")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's fit steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (recipe: 1)")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument("--caption-joint", action="store_true",
                        help="train the model with the caption decoder instead and ship both (CaptionDemoRecipe)")
    parser.add_argument("--device", default=None,
                        help="--caption-joint: auto, cpu, cuda or cuda:N (CaptionDemoRecipe: auto)")
    args = parser.parse_args(argv)
    recipe = DemoRecipe()
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps)
    if args.threads is not None:
        recipe = replace(recipe, threads=args.threads)
    try:
        if recipe.steps < 1 or recipe.threads < 1:
            raise UsageError("--steps and --threads must be >= 1")
        if args.caption_joint and (args.ablation or args.steps is not None):
            raise UsageError("--ablation and --steps belong to the retrieval-only demo, not to --caption-joint",
                             hint="the caption demo's steps are in hbi_training.demo.CaptionDemoRecipe")
        if args.device and not args.caption_joint:
            raise UsageError("--device applies to --caption-joint (the retrieval-only demo trains on the CPU)")
        report = run_demo(args.out, args.seed, artifacts=args.artifacts, recipe=recipe, ablation=args.ablation,
                          progress=args.progress, caption_joint=args.caption_joint,
                          caption=CaptionDemoRecipe(**({"device": args.device} if args.device else {})))
    except HbiError as exc:
        print(f"error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""), file=sys.stderr)
        return exc.exit_code
    shown = {k: v for k, v in report.items() if k != "recipe"}
    if "caption" in shown:
        shown["caption"] = {k: v for k, v in shown["caption"].items() if k != "captions"}
    print(json.dumps(shown, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
