"""One vocabulary across the three command lines: every command of ``hbi-run``, ``hbi-export`` and ``hbi-train``
spells the shared options as ``hbi_runtime.cli_options`` defines them, every app has ``-h``, ``--version`` and a
global ``--debug`` in the same help style, and every example in every ``--help`` text (and in the README) parses.

Needs the three apps, so torch (hbi-export and hbi-train import it lazily, but their modules are collected here
with the export and training extras installed).
"""

from __future__ import annotations

import re
import shlex

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

pytest.importorskip("torch")

CANONICAL = {  # every option of these names is spelled exactly so
    "--format": {"--format", "-f"},
    "--model": {"--model", "-m"},
    "--levels": {"--levels"},
    "--backend": {"--backend"},
    "--device": {"--device"},
    "--workers": {"--workers"},
    "--strict": {"--strict"},
    "--overwrite": {"--overwrite"},
    "--precision": {"--precision"},
    "--debug": {"--debug"},
    "--allow-unverified": {"--allow-unverified"},
}
SHORT = {"-f": "--format", "-m": "--model", "-h": "--help"}
FORMATS = ({"text", "json"}, {"table", "json", "jsonl", "csv"})


def _apps() -> dict:
    from hbi_export.cli import app as export_app
    from hbi_runtime.cli import app as run_app
    from hbi_training.cli import app as train_app

    return {"hbi-run": run_app, "hbi-export": export_app, "hbi-train": train_app}


PARSE_ERRORS = (typer.TyperException, typer.Exit, AssertionError)  # Typer's own click: usage errors, early exits


def _commands(group, prefix: tuple = ()):
    for name, cmd in sorted(getattr(group, "commands", {}).items()):
        if getattr(cmd, "commands", None):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


@pytest.fixture(scope="module")
def apps():
    return {name: get_command(app) for name, app in _apps().items()}


def test_every_app_has_help_version_and_global_debug(apps):
    runner = CliRunner()
    for name, app in _apps().items():
        assert app.rich_markup_mode is None, f"{name}: help style differs (rich markup)"
        root = apps[name]
        flags = {opt for p in root.params for opt in p.opts}
        assert {"--debug", "--version"} <= flags, name
        assert root.context_settings.get("help_option_names") == ["-h", "--help"], name
        result = runner.invoke(app, ["--version"], prog_name=name)
        assert result.exit_code == 0 and result.stdout.startswith(f"{name} "), (name, result.output)
        for path, _ in _commands(root):
            short = runner.invoke(app, [*path, "-h"], prog_name=name)
            assert short.exit_code == 0 and "Usage:" in short.stdout, (name, path, short.output)


def test_shared_options_are_spelled_alike_everywhere(apps):
    problems = []
    seen = {key: 0 for key in CANONICAL}
    for name, root in apps.items():
        for path, cmd in _commands(root):
            where = f"{name} {' '.join(path)}"
            for param in cmd.params:
                if param.param_type_name != "option":
                    continue
                flags = set(param.opts) | set(param.secondary_opts)
                for flag in flags & set(SHORT):
                    if SHORT[flag] not in flags:
                        problems.append(f"{where}: {flag} is not {SHORT[flag]} ({sorted(flags)})")
                for key, want in CANONICAL.items():
                    if key in flags:
                        seen[key] += 1
                        if flags != want and not param.hidden:
                            problems.append(f"{where}: {sorted(flags)} should be {sorted(want)}")
                if "--json" in flags and not param.hidden:
                    problems.append(f"{where}: --json is only a hidden, deprecated alias of --format json")
                if "--format" in flags:
                    if getattr(getattr(param, "type", None), "choices", None):  # Typer < 0.29: a click Choice
                        choices = {getattr(c, "value", c) for c in param.type.choices}
                    else:  # Typer 0.29 keeps the Enum annotation
                        choices = {m.value for m in param.type_descriptor.annotation}
                    if choices not in FORMATS:
                        problems.append(f"{where}: --format choices {sorted(choices)}")
                if ("--levels" in flags and not param.hidden
                        and "level weights entity,action,event" not in (param.help or "").lower()):
                    problems.append(f"{where}: --levels is not the three level weights ({param.help!r})")
                if "--help" in flags or param.name == "help":
                    problems.append(f"{where}: a parameter named help ({sorted(flags)})")
    assert not problems, "\n".join(problems)
    assert all(seen[k] for k in ("--format", "--model", "--levels", "--backend", "--workers", "--overwrite")), seen


def test_backend_ort_is_a_deprecated_alias():
    from hbi_runtime.cli_options import BackendName, _backend

    assert _backend("ort") is BackendName.onnxruntime and _backend("TRT") is BackendName.trt
    with pytest.raises(typer.BadParameter):
        _backend("tensorflow")


def test_levels_have_one_parser():
    from hbi_runtime.cli_options import parse_levels
    from hbi_runtime.errors import UsageError

    assert parse_levels("0.4,0.4,0.2") == (0.4, 0.4, 0.2) and parse_levels(None) is None
    for bad in ("1,0", "a,b,c", "1,0,nan", "1,,0"):
        with pytest.raises(UsageError, match="three comma-separated numbers"):
            parse_levels(bad)


# ---------------------------------------------------------------------------------------------------------------
# every example parses

# a command line in an example (prose names commands in `backticks`: those are not examples)
EXAMPLE = re.compile(r"(?<![\w/`-])(hbi-run|hbi-export|hbi-train)((?: [^\n`]*)?)")
SHELL_STOP = re.compile(r"\s(?:>|\||&&|;|#)")


def _examples(text: str) -> list[tuple[str, list[str]]]:
    out = []
    for prog, rest in EXAMPLE.findall(text or ""):
        rest = SHELL_STOP.split(rest)[0]
        try:
            args = shlex.split(rest)
        except ValueError:  # an unbalanced quote inside prose
            continue
        out.append((prog, args))
    return out


def _resolve(root, args: list[str]):
    cmd, path = root, []
    while getattr(cmd, "commands", None):
        options = [a for a in args if a.startswith("-")]
        if not args or args[0].startswith("-"):
            return cmd, path, args, options
        if args[0] not in cmd.commands:
            raise AssertionError(f"unknown command {args[0]!r}")
        path.append(args[0])
        cmd, args = cmd.commands[args[0]], args[1:]
    return cmd, path, args, []


def _parses(root, prog: str, args: list[str]) -> None:
    globals_ = []
    while args and args[0] in ("--debug",):
        globals_.append(args.pop(0))
    cmd, path, rest, _ = _resolve(root, args)
    if rest and rest[0] in ("-h", "--help", "--version"):
        return
    parent = root.make_context(prog, [*globals_, *path, *rest], resilient_parsing=True)
    ctx = cmd.make_context(" ".join([prog, *path]), list(rest), parent=parent)
    ctx.close()


def _help_texts(root):
    yield "root", (root.help or "") + "\n" + (root.epilog or "")
    for path, cmd in _commands(root):
        yield " ".join(path), (cmd.help or "") + "\n" + (cmd.epilog or "")


def test_every_help_example_parses(apps):
    problems, count = [], 0
    for name, root in apps.items():
        for where, text in _help_texts(root):
            for prog, args in _examples(text):
                count += 1
                try:
                    _parses(apps[prog], prog, list(args))
                except PARSE_ERRORS as exc:
                    problems.append(f"{name} {where}: `{prog} {' '.join(args)}`: {exc}")
    assert count >= 40, count
    assert not problems, "\n".join(problems)


def test_every_readme_example_parses(apps, repo_root):
    text = (repo_root / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    problems, count = [], 0
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for prog, args in _examples(line):
                count += 1
                try:
                    _parses(apps[prog], prog, list(args))
                except PARSE_ERRORS as exc:
                    problems.append(f"`{prog} {' '.join(args)}`: {exc}")
    assert count >= 20, count
    assert not problems, "\n".join(problems)
