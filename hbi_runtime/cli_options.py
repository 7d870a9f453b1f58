"""The one vocabulary of the three command lines (``hbi-run``, ``hbi-export``, ``hbi-train``).

Every CLI app is made by :func:`make_app` (same help style, ``-h`` / ``--help``, global ``--debug`` and
``--version``), and every option that more than one command takes is defined here once, with its spelling, short
flag and value spelling:

=================  ==========================================================================================
``--format/-f``    :data:`FormatOption` (``text`` | ``json``) or :data:`TableFormatOption` (``table`` | ``json`` |
                   ``jsonl`` | ``csv``); ``--json`` survives only as a hidden, deprecated alias (:data:`JsonAlias`)
``--debug``        global (``hbi-run --debug retrieve ...``); after the command it is a hidden alias
``--model/-m``     a model package folder (:data:`ModelOption`)
``--levels``       three level *weights* entity,action,event, one parser (:func:`parse_levels`)
``--backend``      ``onnxruntime`` | ``trt`` | ``triton`` (:data:`BackendOption`; ``ort`` is a deprecated alias)
``--triton-url``   the Triton server of ``--backend triton`` (:data:`TritonUrlOption`)
``--device``       ``cpu`` | ``cuda`` | ``tensorrt``: ONNX Runtime's execution providers (:data:`DeviceOption`);
                   training takes a torch device under the same name (:data:`TorchDeviceOption`)
``--precision``    ``fp32`` | ``fp16`` | ``int8`` (of a package, or of the TensorRT engines to use)
``--workers``      worker processes (:data:`WorkersOption`)
``--strict``       :func:`strict_option` (what counts as a failure is the command's)
``--overwrite``    :func:`overwrite_option` (the rules of :mod:`hbi_runtime.fileio`)
=================  ==========================================================================================

``tests/test_cli_vocabulary.py`` walks every command of the three apps and holds them to this table, and parses
every example of every ``--help`` text.
"""

from __future__ import annotations

import copy
import enum
import functools
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from hbi_runtime.cli_support import OutputFormat, TableFormat, guarded


@dataclass(frozen=True)
class GlobalOptions:
    debug: bool = False


def _print_version(ctx: typer.Context, value: bool) -> None:
    if value:
        from hbi_runtime.version import __version__

        sys.stdout.write(f"{ctx.find_root().info_name} {__version__}\n")
        raise typer.Exit()


_GlobalDebug = Annotated[bool, typer.Option("--debug", help="Show the traceback of any error.")]
_Version = Annotated[Optional[bool], typer.Option("--version", callback=_print_version, is_eager=True,
                                                  help="Print the toolkit version and exit.")]


def _root(ctx: typer.Context, debug: _GlobalDebug = False, _version: _Version = None) -> None:
    ctx.obj = GlobalOptions(debug=debug)


class _LazyCommands(MutableMapping):
    """A group's commands by name, in registration order, each built (Typer's conversion of a registered
    function into a click command: its parameters, their type hints, defaults) on first access only."""

    def __init__(self, builders: dict) -> None:
        self._builders = dict(builders)  # name -> a function that builds the command (order kept)
        self._built: dict = {}

    def __getitem__(self, name: str):
        if name not in self._built:
            self._built[name] = self._builders[name]()
        return self._built[name]

    def __setitem__(self, name: str, command) -> None:
        self._builders.setdefault(name, lambda: command)
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        del self._builders[name]
        self._built.pop(name, None)

    def __iter__(self):
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


class LazyGroup(TyperGroup):
    """The root group of a :func:`make_app` app: lists its commands by name without building them, so that
    ``hbi-run retrieve ...`` builds one command, not all of them; ``--help`` and completion build those they show."""

    def list_commands(self, ctx) -> list[str]:
        return list(self.commands)


class _App(typer.Typer):
    """A Typer app whose click group (:func:`click_group`) builds a command only when it is looked up."""

    def __call__(self, *args, **kwargs):
        return click_group(self)(*args, **kwargs)


def click_group(app: typer.Typer):
    """The click group of ``app`` as ``typer.main.get_command`` makes it, but with each command and sub-group
    built on first use (see :class:`LazyGroup`); the same group, with everything built, is what
    ``typer.main.get_command(app)`` returns (tests use that)."""
    if app._add_completion or not (app.registered_callback or app.info.callback):
        return typer.main.get_command(app)  # not the shape make_app gives: Typer's own build
    style = {"pretty_exceptions_short": app.pretty_exceptions_short, "rich_markup_mode": app.rich_markup_mode}
    shell = copy.copy(app)  # the root callback and its options alone
    shell.registered_commands, shell.registered_groups = [], []
    group = typer.main.get_command(shell)
    builders: dict = {}
    for info in app.registered_commands:
        name = info.name or typer.main.get_command_name(info.callback.__name__)
        builders[name] = functools.partial(typer.main.get_command_from_info, info, **style)
    for info in app.registered_groups:
        sub_style = {**style, **({"suggest_commands": app.suggest_commands} if hasattr(app, "suggest_commands")
                                 else {})}
        build = functools.partial(typer.main.get_group_from_info, info, **sub_style)
        name = typer.main.solve_typer_info_defaults(info).name
        if name:
            builders[name] = build
        else:  # a group added without a name lends its commands to this one: Typer merges them
            builders.update(build().commands)
    group.commands = _LazyCommands(builders)
    return group


def make_app(name: str, help: str, examples: str = "") -> typer.Typer:
    """A Typer app in the house style: plain help with ``-h``, the examples as epilog, a root callback taking
    the global ``--debug`` and ``--version``; errors go through :func:`guarded`, never Typer's pretty printer.
    Running it builds only the command that runs (:func:`click_group`)."""
    app = _App(name=name, help=help, epilog=examples or None, no_args_is_help=True, add_completion=False,
               pretty_exceptions_enable=False, rich_markup_mode=None, cls=LazyGroup,
               context_settings={"help_option_names": ["-h", "--help"]})
    app.callback(help=help)(_root)
    return app


_PROGS = ("hbi-run ", "hbi-export ", "hbi-train ", "python ")


def _verbatim(text: str | None) -> str | None:
    """Mark every paragraph of ``text`` that holds a command line with click's ``\\b`` (kept as written: an
    example is never re-wrapped mid-option, so it can be copied)."""
    if not text:
        return text
    out = []
    for para in text.split("\n\n"):
        if any(line.strip().startswith(_PROGS) for line in para.splitlines()) and not para.startswith("\b"):
            para = "\b\n" + para
        out.append(para)
    return "\n\n".join(out)


def keep_examples(app: typer.Typer) -> typer.Typer:
    """Call once every command is registered: the examples in every help text and epilog are shown verbatim."""
    app.info.epilog = _verbatim(app.info.epilog)
    import inspect

    for info in app.registered_commands:
        doc = info.help or (inspect.getdoc(info.callback) if info.callback else None)
        if _verbatim(doc) != doc:
            info.help = _verbatim(doc)
        info.epilog = _verbatim(info.epilog)
    for group in app.registered_groups:
        group.typer_instance.info.epilog = _verbatim(group.typer_instance.info.epilog)
        keep_examples(group.typer_instance)
    return app


def is_debug(ctx: typer.Context | None, local: bool = False) -> bool:
    """The global ``--debug`` (or the deprecated one after the command)."""
    obj = getattr(ctx, "obj", None) if ctx is not None else None
    return bool(local or getattr(obj, "debug", False))


def run_guarded(ctx: typer.Context | None, json_mode, local_debug: bool = False):
    """:func:`guarded` with the command's JSON mode and the global ``--debug``; ``json_mode`` may be the
    command's format itself (a :class:`TableFormat`: ``jsonl`` errors come on one line)."""
    if isinstance(json_mode, TableFormat):
        return guarded(json_mode=json_mode.is_json, debug=is_debug(ctx, local_debug),
                       json_lines=json_mode is TableFormat.jsonl)
    return guarded(json_mode=bool(json_mode), debug=is_debug(ctx, local_debug))


def deprecated(old: str, new: str) -> None:
    sys.stderr.write(f"warning: {old} is deprecated; use {new}\n")


# ------------------------------------------------------------------------------------------ output and debugging
FORMAT_FLAGS = ("--format", "-f")
FormatOption = Annotated[OutputFormat, typer.Option(
    *FORMAT_FLAGS, case_sensitive=False,
    help="text for people, json for scripts (one document with a \"schema\" key).")]
TableFormatOption = Annotated[TableFormat, typer.Option(
    *FORMAT_FLAGS, case_sensitive=False,
    help="table for people; json (one document), jsonl (one row per line) or csv (the same columns) for scripts.")]
JsonAlias = Annotated[bool, typer.Option("--json", hidden=True, help="Deprecated: --format json.")]
DebugAlias = Annotated[bool, typer.Option("--debug", hidden=True,
                                          help="Deprecated here: give --debug before the command.")]


def output_format(fmt: OutputFormat, json_alias: bool) -> OutputFormat:
    """The format, honouring the deprecated ``--json`` flag (with a warning)."""
    if json_alias:
        deprecated("--json", "--format json")
        return OutputFormat.json
    return fmt


# ------------------------------------------------------------------------------------------ model and levels
ModelOption = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="Model package folder (hbi-export onnx). Default: the demo model, when installed.",
    show_default=False)]

LEVELS_HELP = "Level weights entity,action,event, e.g. 1,0,0 (the official retrieval ranking) or 0.4,0.4,0.2."
LevelsOption = Annotated[Optional[str], typer.Option("--levels", help=LEVELS_HELP + " Default: the package's.",
                                                     show_default=False)]


def parse_levels(text: Optional[str], option: str = "--levels") -> tuple[float, float, float] | None:
    """``"0.4,0.4,0.2"`` -> ``(0.4, 0.4, 0.2)``; None stays None (the package's default).

    Raises:
        UsageError: not three comma-separated finite numbers.
    """
    if text is None:
        return None
    import math

    from hbi_runtime.errors import UsageError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{option} must be three comma-separated numbers (entity,action,event), got {text!r}",
                         hint=f"e.g. {option} 1,0,0 or {option} 0.4,0.4,0.2")
    return values


# ------------------------------------------------------------------------------------------ backends and devices
class BackendName(str, enum.Enum):
    onnxruntime = "onnxruntime"
    trt = "trt"
    triton = "triton"


_BACKEND_ALIASES = {"ort": BackendName.onnxruntime}


def _backend(value) -> BackendName:
    if isinstance(value, BackendName):
        return value
    text = str(value).lower()
    if text in _BACKEND_ALIASES:
        deprecated(f"--backend {text}", f"--backend {_BACKEND_ALIASES[text].value}")
        return _BACKEND_ALIASES[text]
    try:
        return BackendName(text)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(b.value for b in BackendName)}") from None


# Annotated as str: the parser hands back a BackendName (a str), which Typer < 0.29 replaces by None when the
# annotation is the Enum itself (its Enum conversion runs after a parser=).
BackendOption = Annotated[str, typer.Option(
    "--backend", parser=_backend, metavar="[onnxruntime|trt|triton]",
    help="onnxruntime (the default), trt (TensorRT engines from `hbi-export build-engine`) or triton (the encoders "
         "on a Triton server: --triton-url).")]
TritonUrlOption = Annotated[Optional[str], typer.Option(
    "--triton-url", help="With --backend triton: the server, grpc://HOST:PORT or http://HOST:PORT.",
    show_default=False)]


class Device(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"
    tensorrt = "tensorrt"


DeviceOption = Annotated[Optional[Device], typer.Option(
    "--device", case_sensitive=False, show_default=False,
    help="ONNX Runtime execution provider: cpu, cuda or tensorrt (the last two need onnxruntime-gpu). "
         "Default: cuda for --backend trt, else cpu.")]
TorchDeviceOption = Annotated[str, typer.Option("--device", help="torch device: auto, cpu, cuda or cuda:N.")]

PrecisionOption = Annotated[Optional[str], typer.Option(
    "--precision", help="With --backend trt: the engines to use, fp32, fp16 or int8 (default: the only ones built).",
    show_default=False)]
EnginePrecisionAlias = Annotated[Optional[str], typer.Option("--engine-precision", hidden=True,
                                                             help="Deprecated: --precision.")]


def engine_precision(precision: Optional[str], alias: Optional[str]) -> Optional[str]:
    if alias is not None:
        deprecated("--engine-precision", "--precision")
        return precision or alias
    return precision


# ------------------------------------------------------------------------------------------ progress
class Steps:
    """What a long command is doing, one line per step with a spinner and its elapsed time, on a terminal's
    stderr: ``with Steps(enabled=not json_mode) as say: export(..., progress=say)``. Each call starts a step
    (the previous one stays on screen with its time), except a count for the current step (same ``label:``).
    Silent when disabled (JSON mode) or when stderr is not a terminal, so logs and pipes stay clean.
    ``console``: the rich console to draw on (default: a new one on stderr); a command that also shows a progress
    bar passes the bar's console, so that the bar nests under the step lines instead of fighting them for the
    terminal."""

    def __init__(self, enabled: bool = True, console=None) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._console = console
        self._bar = None
        self._task = None
        self._label: str | None = None

    def __enter__(self) -> Steps:
        return self

    def __call__(self, message: str) -> None:
        """Start a step, or (a message with the current step's ``label:`` prefix, e.g. ``held-out: 8/16 videos``)
        update the current one in place."""
        if not self.enabled:
            return
        from hbi_runtime.names import printable

        label = message.split(":", 1)[0] if ":" in message else None
        if self._task is not None and label is not None and label == self._label:
            self._bar.update(self._task, description=printable(message))
            return
        self._label = label
        if self._bar is None:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bar = Progress(SpinnerColumn(finished_text="done"), TextColumn("{task.description}"),
                                 TimeElapsedColumn(), console=self._console or Console(stderr=True))
            self._bar.__enter__()
        if self._task is not None:
            self._bar.update(self._task, total=1, completed=1)
        self._task = self._bar.add_task(printable(message), total=None)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            if self._task is not None and exc[0] is None:
                self._bar.update(self._task, total=1, completed=1)
            self._bar.__exit__(*exc)


# ------------------------------------------------------------------------------------------ work and files
WorkersOption = Annotated[int, typer.Option("--workers", min=1, help="Worker processes (video decoding).")]


class Executor(str, enum.Enum):
    local = "local"
    ray = "ray"


ExecutorOption = Annotated[Executor, typer.Option(
    "--executor", case_sensitive=False,
    help="Where videos are decoded and encoded: local (worker processes here) or ray (an actor pool on a Ray "
         "cluster, needs the `ray` extra; docs/scale.md). Not --engine: an engine is a TensorRT plan.")]
RayAddressOption = Annotated[Optional[str], typer.Option(
    "--ray-address", show_default=False,
    help="With --executor ray: `auto` (the cluster this machine belongs to) or HOST:PORT / ray://HOST:PORT. "
         "Default: start a Ray on this machine for the run.")]
ActorsOption = Annotated[Optional[int], typer.Option(
    "--actors", min=1, show_default=False,
    help="With --executor ray: actors in the pool, each loading the model once (default: one per cluster CPU).")]
GpusPerActorOption = Annotated[float, typer.Option(
    "--gpus-per-actor", min=0, help="With --executor ray: GPUs each actor reserves (GPU clusters).")]
AllowUnverifiedOption = Annotated[bool, typer.Option(
    "--allow-unverified", help="Use a package whose parity check failed or never ran.")]


ExactOption = Annotated[bool, typer.Option(
    "--exact", help="Score every video (exhaustive HBI scoring) even where the candidate stage would answer (by "
                    "default it does from 20,000 indexed videos on; docs/candidates.md).")]
TwoStageOption = Annotated[bool, typer.Option(
    "--two-stage", help="Rank with the index's candidate stage at any gallery size, then score the candidates "
                        "exactly (its measured recall: docs/candidates.md).")]


def strict_option(help: str):
    """``--strict`` (a plain flag) with the command's own meaning of failure."""
    return Annotated[bool, typer.Option("--strict", help=help)]


def overwrite_option(what: str):
    """``--overwrite`` (a plain flag): replace ``what`` at the output (never an input, never another folder)."""
    return Annotated[bool, typer.Option(
        "--overwrite", help=f"Replace {what} at the output (never an input; any other non-empty folder is "
                            "refused).")]


__all__ = ["LEVELS_HELP", "ActorsOption", "AllowUnverifiedOption", "BackendName", "BackendOption", "DebugAlias",
           "Device", "DeviceOption", "EnginePrecisionAlias", "ExactOption", "Executor", "ExecutorOption",
           "FormatOption", "GpusPerActorOption", "GlobalOptions", "JsonAlias", "LevelsOption", "ModelOption",
           "PrecisionOption", "RayAddressOption", "Steps", "TableFormatOption", "TorchDeviceOption", "TritonUrlOption",
           "TwoStageOption", "WorkersOption",
           "deprecated", "keep_examples",
           "engine_precision", "is_debug", "make_app", "output_format", "overwrite_option", "parse_levels",
           "run_guarded", "strict_option"]
