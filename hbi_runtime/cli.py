"""``hbi-run``: the torch-free command line of hbi-toolkit.

Commands are thin: each parses its options and hands off to one library function inside
:func:`hbi_runtime.cli_support.guarded`, which turns errors into a message, a hint and an exit code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_runtime.bench.cli import register as _register_bench
from hbi_runtime.cli_options import (ActorsOption, AllowUnverifiedOption, BackendName, BackendOption, Device,
                                     DeviceOption, EnginePrecisionAlias, ExactOption, Executor, ExecutorOption,
                                     FormatOption, GpusPerActorOption, LevelsOption, ModelOption, PrecisionOption,
                                     RayAddressOption, TableFormatOption, TritonUrlOption, TwoStageOption,
                                     WorkersOption,
                                     engine_precision, keep_examples, make_app, parse_levels, run_guarded,
                                     strict_option)
from hbi_runtime.cli_support import OutputFormat, TableFormat, csv_text, emit_json
from hbi_runtime.names import exact_text, path_b64, printable
from hbi_runtime.tasks.cli import register as _register_tasks
from hbi_runtime.triton_host import register as _register_triton_host

app = make_app("hbi-run", "Run HBI video-text retrieval models without torch (ONNX Runtime / TensorRT).",
               "Examples:\n\n  hbi-run demo\n\n  hbi-run doctor\n\n  hbi-run --debug doctor --format json")


@app.command(epilog="Examples:\n\n  hbi-run doctor\n\n  hbi-run doctor --model pkg/msrvtt --format json > doctor.json")
def doctor(
    ctx: typer.Context,
    models: Annotated[Optional[list[Path]], typer.Option(
        "--model", "-m", help="A model package to judge (repeatable). Default: the demo model, when installed.",
        show_default=False)] = None,
    output_format: FormatOption = OutputFormat.text,
) -> None:
    """Report the toolkit, Python, platform, numpy, each optional backend, the GPU, the TensorRT plugin library,
    and which model packages and engines are usable here (with the next step for each that is not).

    Backends: onnxruntime (with its execution providers), tensorrt, torch (looked up, never imported),
    decord and av (video decoding). GPUs are listed through cuda-python. Exit code 0 whatever is missing: this
    command only reports.
    """
    json_mode = output_format is OutputFormat.json
    with run_guarded(ctx, json_mode):
        from hbi_runtime import doctor as doctor_lib  # here: importlib.metadata and platform probes cost every start

        packages = models if models else ([DEMO_PACKAGE] if (DEMO_PACKAGE / "manifest.json").exists() else [])
        report = doctor_lib.collect()
        report["packages"] = doctor_lib.judge_packages(report, packages)
        if json_mode:
            emit_json(report)
        else:
            sys.stdout.write(doctor_lib.render_text(report))


# ------------------------------------------------------------------------------------------ model, index, search
DEMO_PACKAGE = Path(__file__).resolve().parent / "data" / "demo" / "package"
@dataclass(frozen=True)
class BackendChoice:
    name: BackendName = BackendName.onnxruntime
    engine_precision: Optional[str] = None
    device: Optional[Device] = None
    triton_url: Optional[str] = None


def _choice(backend: BackendName, precision: Optional[str], alias: Optional[str],
            device: Optional[Device] = None, triton_url: Optional[str] = None) -> BackendChoice:
    return BackendChoice(backend, engine_precision(precision, alias), device, triton_url)


def _load_model(model: Optional[Path], allow_unverified: bool, backend: BackendChoice = BackendChoice(), *,
                few_calls: bool = False):
    """The model on the chosen backend and device: ``--backend trt`` runs the engines of ``hbi-export build-engine``
    (on ``cuda``); ``--backend onnxruntime`` runs on ``--device cpu`` (default), ``cuda``, or ``tensorrt`` (ONNX
    Runtime's TensorRT execution provider, where ``--precision`` is its precision); ``--backend triton`` sends the
    encoders to the Triton server at ``--triton-url``. ``few_calls``: the process runs a graph a few times and
    exits (ONNX Runtime's threads do not spin: less CPU at start, same outputs)."""
    from hbi_runtime.model import load

    package, options = _load_args(model, backend)
    if few_calls and backend.name is BackendName.onnxruntime:
        options = {**options, "spinning": False}
    return load(package, allow_unverified=allow_unverified, **options)


def _load_args(model: Optional[Path], backend: BackendChoice) -> tuple[Path, dict]:
    """The package folder and the :func:`hbi_runtime.model.load` options of ``_load_model`` (what Ray actors load)."""
    from hbi_runtime.errors import UsageError

    if model is None:
        if not (DEMO_PACKAGE / "manifest.json").exists():
            raise UsageError("no model package given",
                             hint="pass --model PKG; make one with `hbi-export onnx --checkpoint CKPT --out PKG`")
        model = DEMO_PACKAGE
    device = backend.device.value if backend.device is not None else None
    if (backend.triton_url is not None) != (backend.name is BackendName.triton):
        raise UsageError("--backend triton and --triton-url go together",
                         hint="e.g. --backend triton --triton-url grpc://localhost:8011")
    if backend.name is BackendName.triton:
        if device is not None or backend.engine_precision is not None:
            raise UsageError("--device and --precision do not go with --backend triton: the server decides them",
                             hint="for TensorRT plans in Triton: `hbi-export triton PKG OUT --engines DIR`")
        from hbi_runtime.backends.triton import import_tritonclient, parse_url

        import_tritonclient(parse_url(backend.triton_url)[0])  # fail before any decoding starts, with the hint
        return model, {"backend": "triton", "url": backend.triton_url}
    if backend.name is BackendName.trt:
        if device not in (None, "cuda"):
            raise UsageError(f"--backend trt runs its engines on --device cuda, not {device}",
                             hint="--device tensorrt is ONNX Runtime's TensorRT execution provider: use it with "
                                  "--backend onnxruntime" if device == "tensorrt" else None)
        from hbi_runtime.backends.tensorrt import import_tensorrt

        import_tensorrt()  # fail before any decoding starts, with the install hint
        return model, {"backend": "trt", "precision": backend.engine_precision}
    if backend.engine_precision is not None and device != "tensorrt":
        raise UsageError("--precision goes with --backend trt (engines) or --device tensorrt (ONNX Runtime's "
                         "TensorRT execution provider)")
    if device in ("cuda", "tensorrt"):
        from hbi_runtime.bench.run import check_ort_provider

        check_ort_provider(device)  # before any decoding starts
        options: dict = {"providers": device}
        if device == "tensorrt" and backend.engine_precision is not None:
            options["tensorrt"] = {"precision": backend.engine_precision}
        return model, options
    return model, {}


class _Progress:
    """A progress bar on a terminal's stderr (files, windows, rate, elapsed, ETA) fed by ``update_index``'s
    callbacks; it appears with the first file, so an error before any work prints no empty bar. Quiet in JSON mode
    and when stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._bar = None
        self._windows = ""

    def __enter__(self) -> "_Progress":
        return self

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._bar = Progress(TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
                             TextColumn("{task.fields[windows]}"), TextColumn("{task.fields[rate]}"),
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                             TextColumn("{task.fields[path]}"), console=Console(stderr=True), transient=False)
        self._bar.__enter__()
        self._task = self._bar.add_task("index", total=None, rate="", path="", windows="")

    def __call__(self, done: int, total: int, path: Optional[str], rate: float) -> None:
        if not self.enabled or total == 0:
            return
        if self._bar is None:
            self._start()
        self._bar.update(self._task, completed=done, total=total, rate=f"{rate:.1f} files/s",
                         path=(path or "")[-40:], windows=self._windows)

    def windows(self, count: int, path: str) -> None:
        """Windows decoded so far (long videos with --window): the bar moves while one file's windows decode."""
        self._windows = f"{count} windows"
        if self.enabled and self._bar is not None:
            self._bar.update(self._task, windows=self._windows, path=path[-40:])

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _warn_workers(workers: int) -> None:
    from hbi_runtime.scoring.engine import default_threads

    cores = default_threads()
    if workers > cores:
        sys.stderr.write(f"warning: --workers {workers} is more than the {cores} CPU core(s) this process may use: "
                         "decoding gets no faster and each worker holds frames in memory\n")


def _index_folder(model, videos: Path, index_dir: Optional[Path], *, workers: int, batch_size: int,
                  window: Optional[float], stride: Optional[float], rebuild: bool = False, quiet: bool = False,
                  **options):
    from hbi_runtime.errors import BadInputError
    from hbi_runtime.index import DEFAULT_EXTENSIONS, default_index_dir, update_index

    _warn_workers(workers)
    target = index_dir or default_index_dir(videos, model)
    with _Progress(enabled=not quiet) as progress:
        summary = update_index(model, videos, target, workers=workers, batch_size=batch_size, window=window,
                               stride=stride, rebuild=rebuild, progress=progress, window_progress=progress.windows,
                               **options)
    if not (summary.new or summary.unchanged or summary.reindexed or summary.removed or summary.failed
            or summary.recovered or summary.resumed):
        raise BadInputError(f"no video files in {printable(str(videos))}",
                            hint=f"video files end in {', '.join(sorted(DEFAULT_EXTENSIONS))}")
    return summary


def _summary_text(d: dict) -> str:
    extra = "".join(f", {d[k]} {k}" for k in ("recovered", "resumed") if d[k])
    tried = sum(f["attempted"] for f in d["failed"])
    lines = [f"index {printable(d['index'])}: {d['new']} new, {d['unchanged']} unchanged, {d['reindexed']} "
             f"re-indexed, {d['removed']} removed{extra}, {len(d['failed'])} failed ({tried} tried in this run), "
             f"{len(d['skipped'])} skipped ({d['seconds']:.1f} s)"]
    if d["moved_aside"]:
        lines.append(f"  the damaged catalog was moved aside to {printable(d['moved_aside'])}")
    lines += [f"  repaired: shard {r['shard']} was damaged ({printable(r['reason'])}); its {r['videos']} "
              "video(s) were re-indexed" for r in d["repaired"]]
    lines += [f"  failed: {f['path']}: {printable(f['reason'])}"
              + ("" if f["attempted"] else f" (earlier run; {f['kind']}, retried "
                 + ("every run)" if f["kind"] == "transient" else "when the file changes or with --retry-failed)"))
              for f in d["failed"]]
    lines += [f"  skipped: {f['path']}: {printable(f['reason'])}" for f in d["skipped"]]
    cand = d.get("candidates")
    if cand and cand.get("reason"):
        lines.append(f"  note: no candidate index (retrieval over large galleries stays exhaustive): {cand['reason']}")
    elif cand:
        lines.append(f"  candidate index: {cand['rows']} rows, {cand['nlist']} centroids, "
                     f"{cand['bytes'] / 2**20:.1f} MiB" + (f", {cand['coded']} coded in {cand['seconds']:.1f} s"
                                                          if cand["built"] else ", up to date"))
    return "\n".join(lines) + "\n"


def _status_text(d: dict) -> str:
    window = "whole videos" if not d["window"] else f"windows of {d['window']['window']} s"
    sha = (d["model_sha256"] or "?")[:12]
    size = d["shard_bytes"] / 2**20
    lines = [f"index {printable(d['index'])}",
             f"  videos from {printable(str(d['video_dir']))}; model {printable(str(d['model_name']))} ({sha}), "
             f"{d['storage_dtype']} storage, {window}",
             f"  last commit {d['last_commit'] or 'never'}; {d['videos']} video(s) indexed, {d['failed_count']} "
             f"failed, {d['not_indexed']} not indexed (damaged shards); {d['rows']} row(s) in {d['shards']} shard(s), "
             f"{size:.1f} MiB; checked: {d['verified']}"]
    lines += [f"  failed: {printable(f['path'])}: {printable(f['reason'])} ({f['kind']})" for f in d["failed"]]
    lines += [f"  damaged: shard {x['shard']} ({x['videos']} video(s)): {printable(x['reason'])}"
              for x in d["damaged_shards"]]
    if d["damaged_shards"]:
        lines.append(f"  repair: hbi-run index {printable(str(d['video_dir']))} --index {printable(d['index'])}")
    cand = d.get("candidates") or {}
    if cand.get("state") == "ready":
        lines.append(f"  candidate index: {cand['rows']} rows, {cand['nlist']} centroids, "
                     f"{cand['bytes'] / 2**20:.1f} MiB, built {cand['created']}; scorer {cand['scorer']}")
    elif cand:
        lines.append(f"  candidate index: {printable(cand['reason'])} (retrieval stays exhaustive)")
    if d["pending"]:
        p = d["pending"]
        lines.append(f"  an unfinished run (started {p['started']}) holds {p['videos']} encoded video(s) that "
                     "readers do not see yet: run `hbi-run index` again to finish it")
    return "\n".join(lines) + "\n"


@app.command(epilog="Examples:\n\n  hbi-run index ~/Videos --model pkg/b32\n\n"
                    "  hbi-run index ~/Videos --model pkg/b32 --window 30 --index ~/Videos-index --format json\n\n"
                    "  hbi-run index --status --index ~/Videos-index\n\n"
                    "  hbi-run index /mnt/shared/videos -m pkg/b32 --index /mnt/shared/index --executor ray "
                    "--ray-address auto\n\n"
                    "  hbi-run index ~/Videos --model pkg/b32 --retry-failed --verify --strict\n\n"
                    "  hbi-run index ~/Videos -m pkg/b32 --backend triton --triton-url grpc://localhost:8011")
def index(
    ctx: typer.Context,
    videos: Annotated[Optional[Path], typer.Argument(
        help="Folder of videos (searched recursively, never written to). Optional with --status --index.",
        show_default=False)] = None,
    model: ModelOption = None,
    index_dir: Annotated[Optional[Path], typer.Option(
        "--index", help="Index folder. Default: a per-folder cache directory (see README).",
        show_default=False)] = None,
    workers: WorkersOption = 2,
    batch_size: Annotated[int, typer.Option(min=1, help="Videos per encoder call and per committed shard.")] = 16,
    window: Annotated[Optional[float], typer.Option(
        help="Index long videos as windows of this many seconds (at least 1).", show_default=False)] = None,
    stride: Annotated[Optional[float], typer.Option(
        help="Seconds between window starts (at least 1; default: --window).", show_default=False)] = None,
    rebuild: Annotated[bool, typer.Option(
        help="Index everything again (readers keep the old index until it is done); moves an unreadable "
             "catalog aside.")] = False,
    retry_failed: Annotated[bool, typer.Option(
        help="Decode again every file that failed before (transient failures are retried anyway).")] = False,
    force: Annotated[bool, typer.Option(
        help="Allow a run that drops more than half of the index (e.g. after moving most videos away).")] = False,
    verify: Annotated[bool, typer.Option(
        help="Hash every shard against its checksums (default: about 1 GiB of them per run).")] = False,
    status: Annotated[bool, typer.Option(
        help="Report the index (counts, failed files, damaged shards, model, folder, last commit); index "
             "nothing.")] = False,
    strict: strict_option("Exit 3 while any file has failed (or, with --status, any shard is damaged).") = False,
    allow_unverified: AllowUnverifiedOption = False,
    backend: BackendOption = BackendName.onnxruntime,
    precision: PrecisionOption = None,
    engine_precision_alias: EnginePrecisionAlias = None,
    device: DeviceOption = None,
    executor: ExecutorOption = Executor.local,
    ray_address: RayAddressOption = None,
    actors: ActorsOption = None,
    gpus_per_actor: GpusPerActorOption = 0.0,
    triton_url: TritonUrlOption = None,
    output_format: FormatOption = OutputFormat.text,
) -> None:
    """Index a folder of videos: incremental (only new or changed files are encoded), crash-safe, resumable.

    Each video's side is stored once; deleted files are dropped. Bad files are reported with their reason and
    never stop the run; every summary lists all files that are not indexed. Files that failed for a passing
    reason (permissions, I/O, timeout) are retried by every run. Readers see the index as it was until the run
    ends. Damaged shards are found (cheap checks always, checksums within a budget or with --verify) and their
    videos indexed again.
    """
    json_mode = output_format is OutputFormat.json
    failed = False
    with run_guarded(ctx, json_mode):
        from hbi_runtime.errors import UsageError

        if status:
            result = _index_status(videos, index_dir, model, allow_unverified, verify)
            failed = bool(result["failed"] or result["damaged_shards"])
            if json_mode:
                emit_json(result)
            else:
                sys.stdout.write(_status_text(result))
        else:
            if videos is None:
                raise UsageError("give the folder of videos to index", hint="hbi-run index VIDEO_DIR (or --status)")
            choice = _choice(backend, precision, engine_precision_alias, device, triton_url)
            run_on = _executor(executor, ray_address, actors, gpus_per_actor, model, choice)
            with _load_model(model, allow_unverified, choice) as m:
                summary = _index_folder(m, videos, index_dir, workers=workers, batch_size=batch_size,
                                        window=window, stride=stride, rebuild=rebuild, quiet=json_mode,
                                        retry_failed=retry_failed, force=force, verify=verify, executor=run_on)
                result = summary.to_dict(m.package.manifest_sha256)
            failed = bool(summary.failed)
            if json_mode:
                emit_json(result)
            else:
                sys.stdout.write(_summary_text(result))
    if strict and failed:
        raise SystemExit(3)


def _executor(executor: Executor, address: Optional[str], actors: Optional[int], gpus_per_actor: float,
              model: Optional[Path], choice: BackendChoice):
    """None for --executor local, else the Ray executor (fails now, with the install hint, without Ray)."""
    from hbi_runtime.errors import UsageError

    if executor is Executor.local:
        if address is not None or actors is not None or gpus_per_actor:
            raise UsageError("--ray-address, --actors and --gpus-per-actor go with --executor ray")
        return None
    from hbi_runtime.index.ray_executor import RayExecutor, RayOptions

    package, options = _load_args(model, choice)
    return RayExecutor(RayOptions(address=address, actors=actors, gpus_per_actor=gpus_per_actor, load=options),
                       package)


def _index_status(videos: Optional[Path], index_dir: Optional[Path], model: Optional[Path], allow_unverified: bool,
                  verify: bool) -> dict:
    from hbi_runtime.errors import UsageError
    from hbi_runtime.index import default_index_dir, index_status

    if index_dir is None:
        if videos is None:
            raise UsageError("--status needs the folder of videos or --index DIR")
        with _load_model(model, allow_unverified) as m:  # the default index folder depends on the model package
            index_dir = default_index_dir(videos, m)
    return {"schema": "hbi.index-status/1", **index_status(index_dir, verify=verify)}


MAX_LINES_FILE_BYTES = 16 << 20  # a queries or captions file larger than this is refused, not read


def _read_lines(path: Path, what: str) -> list[str]:
    from hbi_runtime.inputs import read_text_capped
    from hbi_runtime.errors import BadInputError

    text = read_text_capped(path, what, MAX_LINES_FILE_BYTES)
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise BadInputError(f"{what} file {printable(str(path))} is empty")
    return lines


def _ranking_mode(exact: bool, two_stage: bool) -> str:
    from hbi_runtime.errors import UsageError

    if exact and two_stage:
        raise UsageError("--exact and --two-stage exclude each other")
    return "exact" if exact else "two-stage" if two_stage else "auto"


def _one_source(videos: Optional[Path], index_dir: Optional[Path]) -> None:
    from hbi_runtime.errors import UsageError

    if (videos is None) == (index_dir is None):
        raise UsageError("give exactly one of --videos DIR and --index DIR",
                         hint="--videos indexes what is missing first (into the per-folder cache); --index uses an "
                              "existing index")


def _fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(float(seconds), 60)
    return f"{int(m)}:{s:04.1f}"


def _render_hits(results: list, fmt: TableFormat, header: dict) -> str:
    import json

    if fmt is TableFormat.json:
        return json.dumps({**header, "queries": [r.to_dict() for r in results]}, indent=2, ensure_ascii=False) + "\n"
    if fmt is TableFormat.jsonl:
        return "".join(json.dumps({**header, "query": r.query, **h}, ensure_ascii=False) + "\n"
                       for r in results for h in r.to_dict()["hits"])
    if fmt is TableFormat.csv:
        columns = ["rank", "score", "path", "abs_path", "duration_s", "start_s", "end_s", "best_frame_s",
                   "path_b64", "abs_path_b64"]
        return csv_text(["query", *columns, "words"],
                        ([r.query, *(getattr(h, c) for c in columns), " ".join(f"{w.word}@{w.time_s}" for w in h.words)]
                         for r in results for h in r.hits))
    lines = []
    for r in results:
        lines.append(f'query: "{printable(r.query)}"' + ("  (truncated)" if r.truncated else ""))
        for h in r.hits:
            span = f" [{_fmt_time(h.start_s)}-{_fmt_time(h.end_s)}]" if h.start_s > 0 or (
                h.duration_s and h.end_s < h.duration_s - 1e-6) else ""
            lines.append(f"  {h.rank:>3}  {h.score:8.4f}  {h.display or printable(h.path)}{span}  best frame "
                         f"{_fmt_time(h.best_frame_s)}")
            if h.words:
                lines.append("       " + "  ".join(f"{printable(w.word)}@{_fmt_time(w.time_s)}" for w in h.words))
    return "\n".join(lines) + "\n"


def _warn_truncated(results) -> None:
    for r in results:
        if r.truncated:
            sys.stderr.write(f'warning: query "{printable(r.query[:60])}" is longer than the model\'s text length '
                             "and was truncated\n")


@app.command(epilog="Examples:\n\n  hbi-run retrieve \"a dog catches a frisbee\" --videos ~/Videos --model pkg/b32\n\n"
                    "  hbi-run retrieve --queries queries.txt --index ~/Videos-index -m pkg/b32 --format jsonl\n\n"
                    "  hbi-run retrieve --video clip.mp4 --captions captions.txt -m pkg/b32\n\n"
                    "  hbi-run retrieve 'a dog runs' --index ~/Videos-index -m pkg/b32 --backend triton "
                    "--triton-url http://localhost:8010")
def retrieve(
    ctx: typer.Context,
    queries: Annotated[Optional[list[str]], typer.Argument(help="Text queries.", show_default=False)] = None,
    queries_file: Annotated[Optional[Path], typer.Option("--queries", help="A file of queries, one per line.",
                                                         show_default=False)] = None,
    videos: Annotated[Optional[Path], typer.Option(help="Folder of videos: indexes what is missing first.",
                                                   show_default=False)] = None,
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="An index built by `hbi-run index`.",
                                                      show_default=False)] = None,
    video: Annotated[Optional[Path], typer.Option(help="Rank the --captions for this one video instead.",
                                                  show_default=False)] = None,
    captions: Annotated[Optional[Path], typer.Option(help="Captions file (one per line) for --video.",
                                                     show_default=False)] = None,
    model: ModelOption = None,
    top_k: Annotated[int, typer.Option(help="Results per query.")] = 10,
    levels: LevelsOption = None,
    workers: WorkersOption = 2,
    window: Annotated[Optional[float], typer.Option(help="With --videos: index as windows of N seconds.",
                                                    show_default=False)] = None,
    memory_limit_mb: Annotated[float, typer.Option(
        "--memory-limit-mb", min=16, help="Working memory of the scoring engine per chunk of videos.")] = 256,
    verify: Annotated[bool, typer.Option(
        help="Hash every byte of the index against its checksums before answering (about 0.6 s per GB).")] = False,
    allow_unverified: AllowUnverifiedOption = False,
    backend: BackendOption = BackendName.onnxruntime,
    precision: PrecisionOption = None,
    engine_precision_alias: EnginePrecisionAlias = None,
    device: DeviceOption = None,
    triton_url: TritonUrlOption = None,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Add each hit's entity-level Banzhaf interaction map (words x frames, docs/explain.md) to "
                          "the JSON / JSON-lines output.")] = False,
    exact: ExactOption = False,
    two_stage: TwoStageOption = False,
    output_format: TableFormatOption = TableFormat.table,
) -> None:
    """Search videos with text (exact HBI score), or rank captions for one video (--video --captions).

    Each hit says why: the timestamp of its best-matching frame, and for every query word its best frame.
    A damaged index is never searched: the command exits 3 naming the damaged shards and the repair command.
    From 20,000 indexed videos on, the index's candidate stage picks the videos to score exactly (the same
    scores; its measured recall of the exhaustive top 10: docs/candidates.md); --exact scores every video,
    --two-stage uses the candidate stage at any size. The JSON header's "ranking" says which path answered.
    """
    json_mode = output_format.is_json
    with run_guarded(ctx, output_format):
        from hbi_runtime.errors import UsageError
        from hbi_runtime.index import Index
        from hbi_runtime.explain.banzhaf import DEFAULT_SAMPLES
        from hbi_runtime.search import RETRIEVE_SCHEMA, check_queries, rank_captions, search

        mode = _ranking_mode(exact, two_stage)
        weights = parse_levels(levels)
        if top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {top_k}")
        if video is not None or captions is not None:
            if (video is None or captions is None or queries or queries_file or videos or index_dir or verify
                    or explain):
                raise UsageError("--video and --captions go together, without queries, --videos, --index, "
                                 "--verify or --explain")
            choice = _choice(backend, precision, engine_precision_alias, device, triton_url)
            with _load_model(model, allow_unverified, choice) as m:
                ranked = rank_captions(m, str(video), _read_lines(captions, "captions"), top_k=top_k,
                                       level_weights=weights)
                header = {"schema": "hbi.retrieve-captions/1", "model_sha256": m.package.manifest_sha256,
                          "video": exact_text(video), "video_b64": path_b64(video)}
            if json_mode:
                emit_json({**header, "captions": ranked})
            else:
                sys.stdout.write("".join(f"  {r['rank']:>3}  {r['score']:8.4f}  {printable(r['caption'])}\n"
                                         for r in ranked))
            return
        texts = check_queries(list(queries or []) + (_read_lines(queries_file, "queries") if queries_file else []))
        _one_source(videos, index_dir)
        choice = _choice(backend, precision, engine_precision_alias, device, triton_url)
        with _load_model(model, allow_unverified, choice, few_calls=videos is None) as m:
            if videos is not None:
                summary = _index_folder(m, videos, None, workers=workers, batch_size=16, window=window,
                                        stride=None, quiet=json_mode)
                if summary.failed:
                    sys.stderr.write(f"note: {len(summary.failed)} file(s) could not be indexed "
                                     f"(hbi-run index {printable(str(videos))} --status lists them)\n")
                target = summary.index_dir
            else:
                target = index_dir
            idx = Index.open(target, m.package.manifest_sha256, verify=verify)
            if 0 < len(idx.rows) < top_k:
                sys.stderr.write(f"note: --top-k {top_k} is more than the {len(idx.rows)} indexed videos; "
                                 f"showing all\n")
            results = search(m, idx, texts, top_k=top_k, level_weights=weights, memory_limit_mb=memory_limit_mb,
                             explain_samples=DEFAULT_SAMPLES if explain else None,
                             mode=mode)
            ranking = results[0].ranking
            header = {"schema": RETRIEVE_SCHEMA, "model_sha256": m.package.manifest_sha256, "index": str(target),
                      "ranking": ranking}
        if ranking.get("reason"):
            sys.stderr.write(f"warning: every video was scored (no candidate stage): {ranking['reason']}\n")
        if explain and not json_mode:
            sys.stderr.write("note: --explain adds each hit's interaction map to --format json / jsonl output; "
                             "`hbi-run explain QUERY VIDEO` draws it\n")
        _warn_truncated(results)
        sys.stdout.write(_render_hits(results, output_format, header))


@app.command("eval", epilog="Examples:\n\n  hbi-run eval --captions MSRVTT_JSFUSION_test.csv --videos MSRVTT/videos "
                            "--model pkg/msrvtt\n\n  hbi-run eval --captions refs.csv --index ~/msrvtt-index "
                            "-m pkg/msrvtt --format json")
def eval_command(
    ctx: typer.Context,
    captions: Annotated[Path, typer.Option(help="CSV: key,vid_key,video_id,sentence (MSR-VTT JSFusion) or "
                                                "video,caption.", show_default=False)],
    videos: Annotated[Optional[Path], typer.Option(
        help="Folder holding the videos (file stem = video id): indexes what is missing first.",
        show_default=False)] = None,
    model: ModelOption = None,
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="An index built by `hbi-run index`.",
                                                      show_default=False)] = None,
    levels: LevelsOption = None,
    workers: WorkersOption = 2,
    allow_unverified: AllowUnverifiedOption = False,
    backend: BackendOption = BackendName.onnxruntime,
    precision: PrecisionOption = None,
    engine_precision_alias: EnginePrecisionAlias = None,
    device: DeviceOption = None,
    output_format: FormatOption = OutputFormat.text,
) -> None:
    """Retrieval metrics: R@1/5/10/50, MdR and MnR, text->video and video->text."""
    json_mode = output_format is OutputFormat.json
    with run_guarded(ctx, json_mode):
        from hbi_runtime.index import Index
        from hbi_runtime.inputs import read_captions
        from hbi_runtime.search import evaluate

        _one_source(videos, index_dir)
        pairs = read_captions(captions)
        choice = _choice(backend, precision, engine_precision_alias, device)
        with _load_model(model, allow_unverified, choice) as m:
            if videos is not None:
                index_dir = _index_folder(m, videos, None, workers=workers, batch_size=16, window=None,
                                          stride=None, quiet=json_mode).index_dir
            idx = Index.open(index_dir, m.package.manifest_sha256)
            metrics = evaluate(m, idx, pairs, level_weights=parse_levels(levels))
            result = {"schema": "hbi.eval/1", "model_sha256": m.package.manifest_sha256, **metrics}
        if json_mode:
            emit_json(result)
        else:
            for direction in ("t2v", "v2t"):
                r = result[direction]
                sys.stdout.write(f"{direction}: R@1 {r['R@1']:.1f}  R@5 {r['R@5']:.1f}  R@10 {r['R@10']:.1f}  "
                                 f"R@50 {r['R@50']:.1f}  MdR {r['MdR']:.1f}  MnR {r['MnR']:.1f}\n")
            sys.stdout.write(f"({result['captions']} captions, {result['videos']} videos, gallery "
                             f"{result['gallery']})\n")


@app.command(epilog="Examples:\n\n  hbi-run demo\n\n"
                    "  hbi-run demo \"a green cross moves up, then a red circle appears\"")
def demo(
    ctx: typer.Context,
    queries: Annotated[Optional[list[str]], typer.Argument(
        help="Your own queries (default: the demo's example queries).", show_default=False)] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Results shown per query.")] = 3,
    backend: BackendOption = BackendName.onnxruntime,
    precision: PrecisionOption = None,
    engine_precision_alias: EnginePrecisionAlias = None,
    device: DeviceOption = None,
    output_format: FormatOption = OutputFormat.text,
) -> None:
    """Search the bundled sample videos with the bundled demo model (no download, no torch).

    The demo model is a small HBI trained on synthetic videos of coloured shapes (see hbi_runtime/data/demo/
    README.txt); it understands captions like "a red square moves left, then a blue circle appears".
    """
    json_mode = output_format is OutputFormat.json
    with run_guarded(ctx, json_mode):
        import json as _json

        from hbi_runtime.errors import UsageError
        from hbi_runtime.index import Index
        from hbi_runtime.search import search

        root = DEMO_PACKAGE.parent
        if not (DEMO_PACKAGE / "manifest.json").exists():
            raise UsageError("the demo model is not installed with this copy of hbi-toolkit",
                             hint="reinstall hbi-toolkit, or regenerate it: python -m hbi_training.demo")
        examples = _json.loads((root / "queries.json").read_text())["queries"]
        asked = [{"query": q, "expected": None} for q in queries] if queries else examples
        choice = _choice(backend, precision, engine_precision_alias, device)
        with _load_model(None, False, choice) as m:
            summary = _index_folder(m, root / "samples", None, workers=1, batch_size=8, window=None, stride=None,
                                    quiet=True)
            idx = Index.open(summary.index_dir, m.package.manifest_sha256)
            results = search(m, idx, [q["query"] for q in asked], top_k=top_k)
        report = []
        for q, r in zip(asked, results):
            first = r.hits[0].path if r.hits else None
            report.append({"query": q["query"], "expected": q["expected"],
                           "correct": None if q["expected"] is None else first == q["expected"],
                           "hits": [{"rank": h.rank, "score": h.score, "path": h.path} for h in r.hits]})
        if json_mode:
            emit_json({"schema": "hbi.demo/1", "model_sha256": m.package.manifest_sha256, "results": report})
            return
        for item in report:
            mark = "" if item["correct"] is None else ("  [ok]" if item["correct"] else "  [expected "
                                                                                         f"{item['expected']}]")
            sys.stdout.write(f'query: "{item["query"]}"{mark}\n')
            for h in item["hits"]:
                sys.stdout.write(f"  {h['rank']:>3}  {h['score']:8.4f}  {h['path']}\n")
        checked = [i for i in report if i["correct"] is not None]
        if checked:
            sys.stdout.write(f"{sum(i['correct'] for i in checked)} of {len(checked)} example queries ranked their "
                             f"video first (samples: {root / 'samples'})\n")


@app.command(epilog="Examples:\n\n  hbi-run serve                                   # the demo model and its sample videos\n\n"
                    "  hbi-run serve --videos ~/Videos --model pkg/b32 --port 8080\n\n"
                    "  hbi-run serve --index ~/Videos-index -m pkg/b32 --host 0.0.0.0 --api-key-file key.txt "
                    "--tls-cert cert.pem --tls-key key.pem\n\n"
                    "  curl -s localhost:8000/v1/retrieve -H 'Content-Type: application/json' "
                    "-d '{\"queries\": [\"a red circle turns green\"], \"top_k\": 5}'")
def serve(
    ctx: typer.Context,
    model: ModelOption = None,
    index_dir: Annotated[Optional[Path], typer.Option(
        "--index", help="An index built by `hbi-run index` (reloaded when a run commits).", show_default=False)] = None,
    videos: Annotated[Optional[Path], typer.Option(
        help="Folder of videos: indexes what is missing first, then serves it (POST /v1/index/update re-indexes "
             "it). Default with neither: the demo's sample videos.", show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; any non-loopback one needs an API key.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: a free one, printed at start).")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Most queries (or videos) per model call; 1 turns "
                                                       "batching off.")] = 32,
    max_delay_ms: Annotated[float, typer.Option(min=0, help="Longest wait for more requests to join a batch.")
                            ] = 5.0,
    queue_size: Annotated[int, typer.Option(min=1, help="Waiting requests per lane; past it: 503 with "
                                                        "Retry-After.")] = 256,
    request_timeout_s: Annotated[float, typer.Option(min=0.1, help="Deadline of one request (504 past it).")
                                 ] = 30.0,
    api_key_file: Annotated[Optional[Path], typer.Option(
        help="File whose first line is the API key (or set HBI_API_KEY); never on the command line.",
        show_default=False)] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(help="PEM certificate: serve HTTPS.", show_default=False)
                        ] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="PEM key of --tls-cert.", show_default=False)] = None,
    qa_model: Annotated[Optional[Path], typer.Option(
        help="QA package for /v1/qa (default with the demo model: the demo QA model).", show_default=False)] = None,
    caption_model: Annotated[Optional[Path], typer.Option(
        help="Caption package for /v1/caption (default with the demo model: the demo decoder).",
        show_default=False)] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(
        help="Allow browser pages of this origin (repeatable; CORS is off by default).", show_default=False)] = None,
    max_body_kb: Annotated[int, typer.Option(min=1, help="Largest request body.")] = 1024,
    reload_interval_s: Annotated[float, typer.Option(min=0.1, help="How often to look for a newly committed index.")
                                 ] = 2.0,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level (info logs every request).")] = "info",
    workers: WorkersOption = 2,
    allow_unverified: AllowUnverifiedOption = False,
    backend: BackendOption = BackendName.onnxruntime,
    precision: PrecisionOption = None,
    engine_precision_alias: EnginePrecisionAlias = None,
    device: DeviceOption = None,
    triton_url: TritonUrlOption = None,
    exact: ExactOption = False,
    two_stage: TwoStageOption = False,
    output_format: FormatOption = OutputFormat.text,
) -> None:
    """Serve retrieval, QA, captioning and explanations over HTTP from one process that keeps the model and the
    index hot: a JSON API (/v1/..., documented at /docs), a search page at /, /healthz, /readyz, /metrics.

    Concurrent requests are batched (one encoder call per lane, one scoring pass per batch of queries); the index
    is reloaded without restart when `hbi-run index` commits. SIGTERM / Ctrl+C: stops accepting, finishes what is
    in flight, exits 0. Security model and API: docs/serve.md.
    """
    json_mode = output_format is OutputFormat.json
    with run_guarded(ctx, json_mode):
        from hbi_runtime.errors import UsageError
        from hbi_runtime.serve import server as srv

        srv.import_serve_deps()
        if index_dir is not None and videos is not None:
            raise UsageError("give at most one of --videos DIR and --index DIR")
        if (tls_cert is None) != (tls_key is None):
            raise UsageError("--tls-cert and --tls-key go together")
        ranking = _ranking_mode(exact, two_stage)

        def warn(message: str) -> None:
            sys.stderr.write(f"warning: {message}\n")

        if tls_cert is not None:
            srv.check_tls(tls_cert, tls_key)
        key = srv.read_api_key(api_key_file, warn)
        srv.check_address(host, key, tls_cert is not None, warn)
        sock = srv.bind(host, port)
        try:
            rt = _serve_runtime(model, index_dir, videos, qa_model, caption_model, allow_unverified,
                                _choice(backend, precision, engine_precision_alias, device, triton_url), workers,
                                json_mode,
                                dict(max_batch=max_batch, max_delay_ms=max_delay_ms, queue_size=queue_size,
                                     request_timeout_s=request_timeout_s, max_body_bytes=max_body_kb * 1024,
                                     api_key=key, cors_origins=tuple(cors_origin or ()),
                                     reload_interval_s=reload_interval_s, workers=workers,
                                     ranking=ranking))
        except BaseException:
            sock.close()
            raise
        from hbi_runtime.serve.app import create_app

        url = srv.url_of(sock, tls_cert is not None)
        served = rt.holder.current()
        started = {"schema": "hbi.serve/1", "model_sha256": rt.model.package.manifest_sha256, "url": url,
                   "index": str(served.index.dir), "videos": served.videos, "qa": rt.qa is not None,
                   "caption": rt.caption is not None, "api_key": key is not None}
        if json_mode:
            emit_json(started, one_line=True)
        else:
            sys.stdout.write(f"serving {served.videos} video(s) from {printable(str(served.index.dir))}\n"
                             f"  search page: {url}\n  API docs:    {url}docs\n  Ctrl+C (or SIGTERM) stops\n")
            sys.stdout.flush()
        srv.run(create_app(rt), sock, tls_cert=tls_cert, tls_key=tls_key, log_level=log_level,
                grace_s=request_timeout_s + 5, on_stop=rt.close)


def _serve_runtime(model, index_dir, videos, qa_model, caption_model, allow_unverified, choice, workers,
                   json_mode, limits: dict):
    """The loaded models and the opened index of `hbi-run serve` (closed again if anything fails)."""
    from hbi_runtime.serve import open_runtime
    from hbi_runtime.serve.runtime import ServeConfig

    m = _load_model(model, allow_unverified, choice)
    qa = caption = None
    try:
        demo = model is None
        from hbi_runtime.package import detect_kind

        if qa_model is not None or (demo and detect_kind(_QA_DEMO) == "qa"):
            from hbi_runtime.tasks.qa import load_qa

            qa = load_qa(qa_model or _QA_DEMO, allow_unverified=allow_unverified)
        if caption_model is not None or (demo and (_CAPTION_DEMO / "manifest.json").exists()):
            from hbi_runtime.tasks.caption import load_caption

            caption = load_caption(caption_model, allow_unverified=allow_unverified)
        video_dir = None
        if index_dir is None:
            video_dir = videos if videos is not None else DEMO_PACKAGE.parent / "samples"
            summary = _index_folder(m, video_dir, None, workers=workers, batch_size=16, window=None, stride=None,
                                    quiet=json_mode)
            index_dir = summary.index_dir
        return open_runtime(m, index_dir, ServeConfig(**limits), qa=qa, caption=caption, video_dir=video_dir)
    except BaseException:
        for x in (m, qa, caption):
            if x is not None:
                x.close()
        raise


_QA_DEMO = DEMO_PACKAGE.parent / "qa" / "package"
_CAPTION_DEMO = DEMO_PACKAGE.parent / "caption"


# Commands that live with their subsystem register themselves here (one line each).
_register_bench(app)
_register_tasks(app)
_register_triton_host(app)
keep_examples(app)  # last: every command is registered


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``hbi-run``); ``argv`` defaults to ``sys.argv[1:]``."""
    app(args=argv, prog_name="hbi-run")


if __name__ == "__main__":
    main()
