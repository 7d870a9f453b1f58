"""The ``hbi-train`` command line speaks the one vocabulary (``hbi_runtime.cli_options``): plain help with ``-h``,
``--version``, global ``--debug``, ``--format/-f text|json`` everywhere, ``--out/-o``, ``--workers``; the old
spellings are hidden aliases that warn; the caption exports moved to ``hbi-export`` (``register_export``) and
``hbi-train qa export`` forwards to ``hbi-export qa-export``; every example of every help text parses; progress
is shown only on a terminal."""

from __future__ import annotations

import io
import json
import shlex
import sys

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from hbi_runtime.cli_options import make_app
from hbi_training.caption_cli import register_export
from hbi_training.cli import app

runner = CliRunner()
EXPORTS = {"caption-export", "caption-joint-export"}


def _invoke(target, *args):
    return runner.invoke(target, [str(a) for a in args])


def _export_app() -> typer.Typer:
    export = make_app("hbi-export", "the commands hbi_training registers into hbi-export")
    register_export(export)
    return export


def _is_group(cmd) -> bool:  # (Typer runs its own copy of click: duck typing, not isinstance)
    return hasattr(cmd, "commands")


def _commands(cmd, path: tuple[str, ...] = ()):
    """(path, command) of ``cmd`` and every command below it, hidden ones included."""
    yield path, cmd
    if _is_group(cmd):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))


def _leaves(root: typer.Typer):
    return [(path, cmd) for path, cmd in _commands(get_command(root)) if path and not _is_group(cmd)]


def _parse(root, name: str, argv: list[str]):
    """Parse ``argv`` as the shell would hand it to ``name`` (options, types, choices, required ones), through
    the groups down to the command; returns that command and its own arguments. Raises the usage error of a bad
    example."""
    ctx = root.make_context(name, list(argv))
    cmd, rest = root, list(argv)
    while _is_group(cmd):
        sub_name, sub, rest = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        ctx = sub.make_context(sub_name, rest, parent=ctx)
        cmd = sub
    return cmd, rest


# ---------------------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_is_plain_with_h_and_lists_no_moved_command(flag):
    result = _invoke(app, flag)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: hbi-train [OPTIONS] COMMAND")
    assert "╭" not in result.output and "<bool>" not in result.output  # no box, no stray `--help <bool>`
    assert "-h, --help" in result.output and "--version" in result.output and "--debug" in result.output
    for command in ("fit", "estimator", "caption", "caption-joint", "qa"):
        assert f"\n  {command} " in result.output
    assert not any(f"\n  {name} " in result.output for name in EXPORTS)


def test_version():
    from hbi_runtime.version import __version__

    result = _invoke(app, "--version")
    assert result.exit_code == 0 and result.output == f"hbi-train {__version__}\n"


@pytest.mark.parametrize("path", [p for p, _ in _leaves(app)] + [("qa",)], ids=" ".join)
def test_every_command_takes_h(path):
    result = _invoke(app, *path, "-h")
    assert result.exit_code == 0, result.output
    assert "╭" not in result.output and "<bool>" not in result.output


@pytest.mark.parametrize("path", [p for p, c in _leaves(app) if not c.hidden], ids=" ".join)
def test_every_command_speaks_the_vocabulary(path):
    cmd = dict(_leaves(app))[path]
    opts = {o: p for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    assert "-f, --format <text|json>" in _invoke(app, *path, "-h").output
    assert getattr(opts["--format"].default, "value", None) == "text"
    assert opts["--json"].hidden and opts["--debug"].hidden  # deprecated spellings: hidden
    assert "-o" in opts["--out"].opts
    visible = {o for p in cmd.params if not getattr(p, "hidden", False) for o in (*p.opts, *p.secondary_opts)}
    assert not visible & {"--json", "--debug", "--num-workers", "--package", "--retrieval"}
    if "--levels" in opts:  # the shared meaning: three level weights; the caption memory levels are another option
        assert opts["--levels"].hidden and "--memory-levels" in visible
    if "--device" in opts:
        assert "torch device" in opts["--device"].help


def test_the_moved_exports_speak_the_vocabulary_in_hbi_export():
    for path, cmd in _leaves(_export_app()):
        opts = {o: p for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        assert "-f, --format <text|json>" in _invoke(_export_app(), *path, "-h").output
        assert opts["--json"].hidden and opts["--debug"].hidden, path
    caption = get_command(_export_app()).commands["caption-export"]
    opts = {o: p for p in caption.params for o in p.opts}
    assert "-m" in opts["--model"].opts and opts["--retrieval"].hidden and opts["--overwrite"].is_flag


def _examples(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip().startswith(("hbi-train ",
                                                                                           "hbi-export "))]


def _all_examples() -> list[tuple[str, str]]:
    found = []
    for root in (app, _export_app()):
        for path, cmd in _commands(get_command(root)):
            for text in (cmd.help, cmd.epilog, getattr(cmd.callback, "__doc__", None)):
                found += [(" ".join(path) or "(top)", line) for line in _examples(text)]
    return found


def test_there_are_examples():
    assert len(_all_examples()) >= 20


@pytest.mark.parametrize("where, example", _all_examples())
def test_every_example_parses_with_the_current_names(where, example):
    name, *argv = shlex.split(example)
    roots = {"hbi-train": get_command(app), "hbi-export": get_command(_export_app())}
    if name == "hbi-export" and argv and argv[0] not in EXPORTS:  # another hbi-export command: not ours to parse
        return
    cmd, own = _parse(roots[name], name, argv)
    hidden = {o for p in cmd.params if getattr(p, "hidden", False) for o in (*p.opts, *p.secondary_opts)}
    assert not hidden & set(own), f"{example!r} uses a deprecated option"
    assert not cmd.hidden, f"{example!r} uses a deprecated command"


# ------------------------------------------------------------------------------------------------ deprecated names


def test_num_workers_json_and_debug_after_the_command_still_work_with_a_warning(tmp_path):
    result = _invoke(app, "fit", tmp_path, "--out", tmp_path / "run", "--steps", 1, "--num-workers", 2, "--json",
                     "--debug")
    assert result.exit_code == 2
    assert "warning: --num-workers is deprecated; use --workers" in result.stderr
    assert "warning: --json is deprecated; use --format json" in result.stderr
    assert json.loads(result.stdout)["error"]["message"].startswith("the Banzhaf KL needs a trained estimator")
    assert "Traceback" in result.stderr  # --debug after the command: still honoured


def test_global_debug_and_format_json(tmp_path):
    result = _invoke(app, "--debug", "estimator", tmp_path, "-o", tmp_path / "run", "--steps", 1, "-f", "json")
    assert result.exit_code == 2 and "Traceback" in result.stderr and "warning" not in result.stderr
    assert "is not a generated data folder" in json.loads(result.stdout)["error"]["message"]


def test_caption_package_and_levels_are_deprecated_aliases(tmp_path):
    result = _invoke(app, "caption", "--data", tmp_path, "--out", tmp_path / "run", "--package", tmp_path,
                     "--levels", "0,1")
    assert "warning: --package is deprecated; use --model" in result.stderr
    assert "warning: --levels is deprecated; use --memory-levels" in result.stderr
    assert result.exit_code == 3 and "is not a synthetic data set" in result.stderr  # then the command ran


def test_caption_memory_levels_must_be_numbers(tmp_path, monkeypatch):
    import hbi_training.caption

    monkeypatch.setattr(hbi_training.caption, "check_data", lambda _: None)
    result = _invoke(app, "caption", "--data", tmp_path, "--out", tmp_path / "run", "--memory-levels", "entity")
    assert result.exit_code == 2 and "--memory-levels must be comma-separated level numbers" in result.stderr


@pytest.mark.parametrize("name, args", [
    ("caption-export", ["--decoder", "{tmp}/no-decoder", "--out", "{tmp}/pkg"]),
    ("caption-joint-export", ["--run", "{tmp}/run", "--data", "{tmp}", "--out", "{tmp}/artifacts"]),
])
def test_the_old_hbi_train_exports_warn_then_run_the_same_command(tmp_path, name, args):
    argv = [a.format(tmp=tmp_path) for a in args]
    old = _invoke(app, name, *argv)
    new = _invoke(_export_app(), name, *argv)
    assert f"warning: `hbi-train {name}` is deprecated; use `hbi-export {name}`" in old.stderr
    assert old.exit_code == new.exit_code != 0 and "warning" not in new.stderr
    assert old.stderr.splitlines()[1:] == new.stderr.splitlines()  # the same command, the same error


def test_caption_export_retrieval_is_a_deprecated_alias_of_model(tmp_path):
    result = _invoke(_export_app(), "caption-export", "--decoder", tmp_path / "none", "--out", tmp_path / "pkg",
                     "--retrieval", tmp_path)
    assert "warning: --retrieval is deprecated; use --model" in result.stderr and result.exit_code != 0


def test_qa_export_forwards_to_hbi_export_qa_export(tmp_path):
    result = _invoke(app, "qa", "export", "--checkpoint", tmp_path / "none", "--out", tmp_path / "pkg")
    assert "warning: `hbi-train qa export` is deprecated; use `hbi-export qa-export`" in result.stderr
    assert result.exit_code != 0 and not (tmp_path / "pkg").exists()
    helped = _invoke(app, "qa", "export", "--help")
    assert helped.exit_code == 0 and "Usage: hbi-export qa-export" in helped.stdout
    assert "\n  export " not in _invoke(app, "qa", "-h").output


# ------------------------------------------------------------------------------------------------ registration


def test_register_export_adds_the_two_exports_to_a_fresh_app():
    fresh = typer.Typer()
    register_export(fresh)
    assert {c.name for c in fresh.registered_commands} == EXPORTS
    assert not any(c.hidden for c in fresh.registered_commands)
    result = runner.invoke(fresh, ["caption-joint-export", "--help"])
    assert result.exit_code == 0 and "--run" in result.output


def test_preset_choices_are_the_registry():
    from hbi_export.presets import MODEL_PRESETS

    for command in ("fit", "estimator"):
        assert f"--preset <{'|'.join(MODEL_PRESETS)}>" in _invoke(app, command, "-h").output
    assert "demo" in MODEL_PRESETS


# ------------------------------------------------------------------------------------------------ progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_off_a_terminal_and_when_disabled(monkeypatch, capsys):
    from hbi_training.progress import ProgressBar, stages

    bar = ProgressBar(10, 0, "loop")
    assert not bar.enabled  # pytest's stderr is no terminal
    with stages() as say:
        assert not say.enabled
        say("nothing to see")
    bar.update(10, "loss 1")
    bar.close()
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with stages(False) as say:  # --format json / --no-progress: silent on a terminal too
        say("quiet")
    assert not ProgressBar(10, 0, "loop", enabled=False).enabled
    assert sys.stderr.getvalue() == ""
    assert capsys.readouterr().err == ""


def test_stage_lines_and_a_nested_step_bar_on_a_terminal(monkeypatch):
    from hbi_training.progress import ProgressBar, stages

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with stages() as say:
        say("stage one")
        bar = ProgressBar(4, 0, "loop")
        assert bar.enabled
        for step in range(1, 5):
            bar.update(step, f"loss {1 / step:.2f}")
        bar.close()
        say("stage two")
    text = terminal.getvalue()
    assert "stage one" in text and "stage two" in text
