"""The ``hbi-export`` command line as a whole: the shared vocabulary (hbi_runtime.cli_options), commands registered
through the ``hbi_toolkit.export_commands`` entry points, deprecated spellings, examples that parse, and progress
that shows on a terminal only."""

from __future__ import annotations

import json
import shlex
from importlib.metadata import EntryPoint

import pytest
import typer
from typer.testing import CliRunner

import hbi_export.cli as export_cli
from hbi_export.checkpoints import load_checkpoint
from hbi_export.cli import COMMAND_GROUP, app, register_entry_points
from hbi_runtime import __version__
from hbi_runtime.cli_options import make_app
from hbi_runtime.errors import EXIT_USAGE

runner = CliRunner()
OWN = ["inspect", "convert", "init", "onnx", "parity", "check", "build-engine", "qa-export"]
L, T = 12, 8


def _commands() -> dict:
    return typer.main.get_command(app).commands


class StepsRecorder:
    """Stands for hbi_runtime.cli_options.Steps: keeps every step message, whether or not it would be shown."""

    made: list[StepsRecorder] = []

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.messages = enabled, []
        StepsRecorder.made.append(self)

    def __enter__(self) -> StepsRecorder:
        return self

    def __call__(self, message: str) -> None:
        self.messages.append(message)

    def __exit__(self, *exc) -> None:
        pass


@pytest.fixture
def steps(monkeypatch) -> list[StepsRecorder]:
    StepsRecorder.made = []
    monkeypatch.setattr(export_cli, "Steps", StepsRecorder)
    return StepsRecorder.made


# ------------------------------------------------------------------------------------------ help and version
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_every_command_with_both_flags(flag):
    result = runner.invoke(app, [flag])
    assert result.exit_code == 0, result.output
    for name in [*OWN, "calibrate"]:
        assert f"  {name} " in result.stdout, name
    assert "--version" in result.stdout and "--debug" in result.stdout
    assert "--help <bool>" not in result.stdout and "╭" not in result.stdout  # plain help, no boxes


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip().endswith(__version__)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_takes_h_and_format(name):
    result = runner.invoke(app, [name, "-h"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: hbi-export {name} ")
    assert "-f, --format <text|json>" in result.stdout
    assert "--json" not in result.stdout and "--level-weights" not in result.stdout  # deprecated: hidden
    assert "--debug" not in result.stdout  # global: `hbi-export --debug COMMAND`


def _examples(text: str) -> list[list[str]]:
    return [shlex.split(line.strip())[1:] for line in text.splitlines() if line.strip().startswith("hbi-export ")]


def test_every_example_parses():
    """Every ``hbi-export ...`` line in the app's and the commands' help parses (option names, types, choices)."""
    group = typer.main.get_command(app)
    texts = [group.help or "", group.epilog or ""]
    texts += [f"{c.help or ''}\n{c.epilog or ''}" for c in group.commands.values()]
    examples = [args for text in texts for args in _examples(text)]
    assert len(examples) >= 2 * len(group.commands)
    for args in examples:
        i = next(i for i, a in enumerate(args) if not a.startswith("-"))  # global options, then the command
        ctx = group.make_context("hbi-export", args[:i + 1])
        group.commands[args[i]].make_context(args[i], args[i + 1:], parent=ctx)  # raises on a bad example


def test_the_qa_export_help_example_that_used_to_fail_parses():
    """`--format json` in qa-export's own example was rejected (the command only took --json)."""
    group = typer.main.get_command(app)
    assert "--format json" in group.commands["qa-export"].epilog
    group.commands["qa-export"].make_context("qa-export", ["--checkpoint", "c", "--out", "o", "--format", "json"])


# ------------------------------------------------------------------------------------------ entry points
def test_the_entry_points_are_installed():
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group=COMMAND_GROUP)}
    assert found == {"calibrate": "hbi_calibration.cli:register", "caption": "hbi_training.caption_cli:register_export"}
    assert "calibrate" not in export_cli.SKIPPED


def test_caption_exports_come_from_their_entry_point():
    assert "caption" not in export_cli.SKIPPED, export_cli.SKIPPED
    assert {"caption-export", "caption-joint-export"} <= set(_commands())
    result = runner.invoke(app, ["-h"])
    assert "  caption-export " in result.stdout and "  caption-joint-export " in result.stdout


def test_register_entry_points_order_and_failures(monkeypatch, capsys):
    calls = []

    def fake_entry_points(group):
        assert group == "test.group"
        return [EntryPoint("zz-broken", "hbi_calibration.cli:no_such_register", group),
                EntryPoint("mm-optional", "hbi_no_such_optional_dep_xyz.cli:register", group),
                EntryPoint("aa-first", "hbi_calibration.cli:register", group)]

    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(export_cli, "SKIPPED", {})
    target = make_app("hbi-test", "A test app.")

    @target.command("own")
    def own() -> None:
        calls.append("own")

    done = register_entry_points(target, "test.group")
    assert done == ["aa-first"]
    assert "calibrate" in typer.main.get_command(target).commands
    assert set(export_cli.SKIPPED) == {"mm-optional", "zz-broken"}
    assert "hbi_no_such_optional_dep_xyz" in export_cli.SKIPPED["mm-optional"]
    err = capsys.readouterr().err
    assert "zz-broken" in err and "AttributeError" in err  # a broken entry point is said, ...
    assert "mm-optional" not in err  # ... a missing optional dependency is not
    assert runner.invoke(target, ["-h"]).exit_code == 0


# ------------------------------------------------------------------------------------------ options
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    result = runner.invoke(app, ["init", str(root / "model"), "--preset", "tiny", "--seed", "2", "-f", "json"])
    assert result.exit_code == 0, result.output
    return root / "model"


def test_convert_levels(tiny, tmp_path):
    result = runner.invoke(app, ["convert", str(tiny), str(tmp_path / "a"), "--levels", "0.5,0.3,0.2", "-f", "json"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "a")[1].level_weights == (0.5, 0.3, 0.2)
    assert result.stderr == ""


def test_convert_level_weights_is_a_deprecated_alias(tiny, tmp_path):
    result = runner.invoke(app, ["convert", str(tiny), str(tmp_path / "a"), "--level-weights", "0.4", "0.4", "0.2"])
    assert result.exit_code == 0, result.output
    assert "warning: --level-weights A B C is deprecated; use --levels A,B,C" in result.stderr
    assert load_checkpoint(tmp_path / "a")[1].level_weights == (0.4, 0.4, 0.2)
    both = runner.invoke(app, ["convert", str(tiny), str(tmp_path / "b"), "--level-weights", "1", "0", "0",
                               "--levels", "1,0,0"])
    assert both.exit_code == EXIT_USAGE and "give --levels only" in both.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("levels", ["1,0", "1;0;0", "a,b,c", "1,0,nan"])
def test_bad_levels_are_a_usage_error(tiny, tmp_path, levels):
    result = runner.invoke(app, ["convert", str(tiny), str(tmp_path / "a"), "--levels", levels, "-f", "json"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "--levels must be three comma-separated numbers" in json.loads(result.stdout)["error"]["message"]
    assert not (tmp_path / "a").exists()


def test_qa_export_json_is_a_deprecated_alias(tmp_path):
    """``qa-export --json`` still gives JSON (here an error document), with a warning on stderr."""
    result = runner.invoke(app, ["qa-export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                                 "--levels", "1,0", "--json"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "--levels must be three" in json.loads(result.stdout)["error"]["message"]
    assert "warning: --json is deprecated; use --format json" in result.stderr
    short = runner.invoke(app, ["qa-export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                                "--levels", "1,0", "-f", "json"])
    assert short.exit_code == EXIT_USAGE and json.loads(short.stdout)["error"] and short.stderr == ""


@pytest.mark.parametrize("where", ["global", "after the command (deprecated)"])
def test_debug_shows_the_traceback(tmp_path, where):
    args = ["inspect", str(tmp_path / "missing.pt")]
    result = runner.invoke(app, ["--debug", *args] if where == "global" else [*args, "--debug"])
    assert result.exit_code == 3 and "Traceback" in result.stderr
    assert "Traceback" not in runner.invoke(app, args).stderr


def test_plain_flags_have_no_negative_form(tiny, tmp_path):
    for args in (["init", str(tmp_path / "m"), "--no-overwrite"], ["onnx", "--out", "x", "--no-skip-parity"]):
        assert runner.invoke(app, args).exit_code == EXIT_USAGE


# ------------------------------------------------------------------------------------------ progress
def test_no_progress_off_a_terminal(tiny, tmp_path):
    """CliRunner's stderr is no terminal: text and JSON runs print only the result."""
    for fmt in ("text", "json"):
        result = runner.invoke(app, ["init", str(tmp_path / fmt), "--preset", "tiny", "-f", fmt])
        assert result.exit_code == 0 and result.stderr == "", result.output


def test_steps_are_off_in_json_mode(steps, tmp_path):
    assert runner.invoke(app, ["init", str(tmp_path / "a"), "--preset", "tiny"]).exit_code == 0
    assert runner.invoke(app, ["init", str(tmp_path / "b"), "--preset", "tiny", "-f", "json"]).exit_code == 0
    assert [s.enabled for s in steps] == [True, False]
    assert steps[0].messages == ["initialising a random tiny model"]


@pytest.mark.slow
def test_onnx_and_parity_say_each_step_before_it_starts(tiny, steps, tmp_path):
    pkg = tmp_path / "pkg"
    result = runner.invoke(app, ["onnx", "--checkpoint", str(tiny), "--out", str(pkg), "--max-words", str(L),
                                 "--max-frames", str(T), "--skip-parity"])
    assert result.exit_code == 0, result.output
    assert steps[0].enabled and steps[0].messages == [
        f"loading checkpoint {tiny}",
        "exporting text_encoder (fp32)", "checking text_encoder",
        "exporting video_encoder (fp32)", "checking video_encoder",
        "exporting interaction (fp32)", "checking interaction"]
    result = runner.invoke(app, ["parity", str(pkg), "--checkpoint", str(tiny), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert not steps[1].enabled and steps[1].messages == [
        f"loading checkpoint {tiny}", "parity: PyTorch reference", "parity: text_encoder", "parity: video_encoder",
        "parity: interaction"]
    assert result.stderr == "" and json.loads(result.stdout)["status"] == "verified"
