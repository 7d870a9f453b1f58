"""``hbi-run index --executor``: option rules and the message without Ray (runs with or without the `ray` extra)."""

from __future__ import annotations

import json
import sys

from typer.testing import CliRunner

from hbi_runtime import cli
from hbi_runtime.errors import EXIT_USAGE


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args), prog_name="hbi-run")


def test_ray_options_need_the_ray_executor(tmp_path):
    for extra in (["--actors", "2"], ["--ray-address", "auto"], ["--gpus-per-actor", "1"]):
        result = invoke("index", str(tmp_path), "--index", str(tmp_path / "idx"), *extra, "--format", "json")
        assert result.exit_code == EXIT_USAGE, result.output
        assert "go with --executor ray" in json.loads(result.stdout)["error"]["message"]
    assert not (tmp_path / "idx").exists()  # refused before anything was written


def test_ray_executor_without_ray_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    result = invoke("index", str(tmp_path), "--index", str(tmp_path / "idx"), "--executor", "ray")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "pip install 'hbi-toolkit[ray]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "idx").exists()


def test_unknown_executor_is_a_usage_error(tmp_path):
    result = invoke("index", str(tmp_path), "--executor", "spark")
    assert result.exit_code == EXIT_USAGE
