"""hbi-run, in process: doctor's report in both formats, the global --debug, and error mapping."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

import hbi_runtime
from hbi_runtime import cli, doctor
from hbi_runtime.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, BadInputError

BACKENDS = {"onnxruntime", "tensorrt", "torch", "decord", "av"}


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args), prog_name="hbi-run")


def test_doctor_json_report():
    result = invoke("doctor", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "hbi.doctor/1"
    assert report["toolkit"]["version"] == hbi_runtime.__version__
    assert report["python"]["version"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert report["numpy"]["version"]
    assert set(report["backends"]) == BACKENDS
    for name, rep in report["backends"].items():
        assert set(rep) >= {"found", "version", "imported", "error"}, name
    assert report["backends"]["torch"]["imported"] is None  # torch is looked up, never imported


def test_doctor_reports_onnxruntime_providers():
    pytest.importorskip("onnxruntime", reason="onnxruntime comes with the [export] extra")
    rep = json.loads(invoke("doctor", "-f", "json").stdout)["backends"]["onnxruntime"]
    assert rep["imported"] is True and "CPUExecutionProvider" in rep["details"]["providers"]


def test_doctor_text_report():
    result = invoke("doctor")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["hbi-toolkit", hbi_runtime.__version__]
    assert {line.split()[0] for line in lines if line.startswith("  ")} == BACKENDS


def test_missing_backend_is_reported_not_raised():
    rep = doctor.probe_backend(doctor.BackendProbe("hbi_no_such_module", ("hbi-no-such-dist",)))
    assert (rep.found, rep.version, rep.imported, rep.error) == (False, None, None, None)


def test_broken_backend_import_is_reported(tmp_path, monkeypatch):
    (tmp_path / "hbi_broken_backend.py").write_text("raise OSError('libfoo.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rep = doctor.probe_backend(doctor.BackendProbe("hbi_broken_backend", ("hbi-broken-backend",)))
    assert rep.found and rep.imported is False and rep.error == "OSError: libfoo.so: cannot open shared object file"


def test_user_error_maps_to_exit_code_and_json_error(monkeypatch):
    def fail():
        raise BadInputError("cannot read /nowhere", hint="check the path")

    monkeypatch.setattr(doctor, "collect", fail)
    result = invoke("doctor", "--format", "json")
    assert result.exit_code == EXIT_BAD_INPUT
    assert json.loads(result.stdout) == {"error": {"type": "BadInputError", "message": "cannot read /nowhere",
                                                   "hint": "check the path"}}


def test_internal_error_traceback_only_with_debug(monkeypatch):
    def crash():
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "collect", crash)
    plain = invoke("doctor")
    assert plain.exit_code == EXIT_INTERNAL
    assert "internal error: RuntimeError: boom" in plain.stderr and "Traceback" not in plain.stderr
    debug = invoke("--debug", "doctor")
    assert debug.exit_code == EXIT_INTERNAL and "Traceback" in debug.stderr


def test_help_lists_doctor_and_examples():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "doctor" in result.stdout and "Examples:" in result.stdout and "--debug" in result.stdout


def test_version_option():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"hbi-run {hbi_runtime.__version__}\n"


def test_bad_format_is_a_usage_error():
    assert invoke("doctor", "--format", "xml").exit_code == 2


def test_steps_show_progress_on_a_terminal_only(monkeypatch):
    """Long steps say what they do, with elapsed time, on a terminal; pipes, logs and JSON runs stay clean."""
    import io
    import sys

    from hbi_runtime.cli_options import Steps

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with Steps() as say:
        say("exporting text_encoder")
    assert pipe.getvalue() == ""
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    with Steps(enabled=False) as say:  # --format json
        say("exporting text_encoder")
    assert tty.getvalue() == ""
    with Steps() as say:
        say("exporting text_encoder")
        say("checking parity")
    shown = tty.getvalue()
    assert "exporting text_encoder" in shown and "checking parity" in shown and "0:00:0" in shown


def test_jsonl_errors_are_one_line():
    from typer.testing import CliRunner

    from hbi_runtime.cli import app

    result = CliRunner().invoke(app, ["retrieve", "x", "--format", "jsonl"])
    assert result.exit_code == 2
    (line,) = result.stdout.splitlines()
    assert json.loads(line)["error"]["message"].startswith("give exactly one of --videos DIR and --index DIR")


def test_a_cli_start_imports_only_what_a_query_needs(repo_root):
    """What makes `hbi-run retrieve --index` start fast (docs/bench.md, "Cold start") stays true: importing the CLI
    loads no backend and no doctor, the version is no metadata lookup, and a query's modules leave the index
    writer (video decoding, multiprocessing) unimported."""
    import subprocess

    code = ("import sys, hbi_runtime.version; assert 'importlib.metadata' not in sys.modules, 'version'\n"
            "import hbi_runtime.cli\n"
            "heavy = {'onnxruntime', 'torch', 'hbi_runtime.doctor', 'regex', 'ftfy'} & set(sys.modules)\n"
            "assert not heavy, sorted(heavy)\n"
            "import hbi_runtime.index, hbi_runtime.search, hbi_runtime.explain.banzhaf\n"
            "writer = {'hbi_runtime.index.update', 'hbi_runtime.video', 'multiprocessing'} & set(sys.modules)\n"
            "assert not writer, sorted(writer)\n"
            "from hbi_runtime.index import update_index, Window\n"
            "assert update_index.__module__ == 'hbi_runtime.index.update' and Window.__module__.endswith('windows')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _run_main(capsys, group_call, args):
    with pytest.raises(SystemExit) as exc:
        group_call(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_the_lazy_group_helps_and_fails_as_typer_builds_it(capsys):
    """`hbi-run` builds its click group with each command built on first use (cli_options.click_group): the
    top-level help, a command's help and a wrong command name read exactly as with Typer's own, fully built group."""
    import typer

    from hbi_runtime.cli_options import click_group

    full = typer.main.get_command(cli.app)
    for args in (["--help"], ["retrieve", "--help"], ["retreive", "x"], []):
        lazy = _run_main(capsys, lambda a: click_group(cli.app)(args=a, prog_name="hbi-run"), args)
        assert lazy == _run_main(capsys, lambda a: full(args=a, prog_name="hbi-run"), args), args
    code, out, err = _run_main(capsys, cli.main, ["retreive", "x"])
    assert code == 2 and "No such command 'retreive'. Did you mean 'retrieve'" in err and not out
    code, out, _ = _run_main(capsys, cli.main, ["--help"])
    assert code == 0 and all(f"  {name} " in out for name in ("retrieve", "index", "doctor", "serve"))


def test_the_lazy_groups_hold_what_typer_builds():
    """The three apps' lazy groups list the same commands, in the same order, with the same parameters."""
    import typer

    from hbi_export.cli import app as export_app
    from hbi_runtime.cli_options import click_group
    from hbi_training.cli import app as train_app

    for app in (cli.app, export_app, train_app):
        lazy, full = click_group(app), typer.main.get_command(app)
        assert list(lazy.commands) == list(full.commands) and len(lazy.commands) > 3
        assert [p.name for p in lazy.params] == [p.name for p in full.params]
        for name, cmd in full.commands.items():
            built = lazy.commands[name]
            assert type(built) is type(cmd) and built.help == cmd.help and built.hidden == cmd.hidden, name
            assert [(p.name, p.opts, p.default) for p in built.params] == \
                [(p.name, p.opts, p.default) for p in cmd.params], name


def test_a_query_builds_only_its_own_command(monkeypatch, capsys):
    import typer

    built = []
    make = typer.main.get_command_from_info

    def recording(info, **kw):
        command = make(info, **kw)
        built.append(command.name)
        return command

    monkeypatch.setattr(typer.main, "get_command_from_info", recording)
    code, out, _ = _run_main(capsys, cli.main, ["retrieve", "--help"])
    assert code == 0 and "Usage: hbi-run retrieve" in out
    assert built == ["retrieve"]
