"""The distribution as a user gets it: torch-free runtime, console scripts, installed names, wheel contents.

Every subprocess here runs outside the checkout (cwd = a temporary folder), so it sees the *installed*
packages, the way a user does. These tests need the project installed (``pip install -e '.[export,test]'``);
without that they fail and say so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

DIST = "hbi-toolkit"
# repository folder -> name the package is installed under (docs/architecture.md, "Packaging")
PACKAGE_DIRS = {"hbi_export": "hbi_export", "hbi_runtime": "hbi_runtime", "training": "hbi_training",
                "calibration": "hbi_calibration"}

BLOCK_TORCH = '''
import sys

class _NoTorch:
    """Make torch unimportable, as on a deployment box without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test (import of {name!r})")
        return None

sys.meta_path.insert(0, _NoTorch())
'''

IMPORT_ALL_RUNTIME = '''
import importlib, json, pkgutil, sys
import hbi_runtime
names = sorted(m.name for m in pkgutil.walk_packages(hbi_runtime.__path__, "hbi_runtime.")
               if not m.name.endswith("__main__"))
for name in names:
    importlib.import_module(name)
from hbi_runtime import cli
try:
    cli.main(["doctor", "--format", "json"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
assert "torch" not in sys.modules, "hbi_runtime imported torch"
print(json.dumps(names))
'''


@pytest.fixture(scope="module")
def dist():
    try:
        return distribution(DIST)
    except PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed in {sys.prefix}: run pip install -e '.[export,test]' first")


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-c", code], cwd)


def console_script(name: str, module: str) -> list[str]:
    """The installed console script, or ``python -m module`` where it is not on disk (never a skip)."""
    script = Path(sys.executable).with_name(name)
    found = str(script) if script.exists() else shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def test_runtime_imports_and_runs_without_torch(tmp_path, dist):
    result = python(BLOCK_TORCH + IMPORT_ALL_RUNTIME, tmp_path)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"hbi_runtime.cli", "hbi_runtime.sides", "hbi_runtime.errors", "hbi_runtime.doctor"} <= set(imported)


def test_blocker_really_blocks_torch(tmp_path):
    result = python(BLOCK_TORCH + "import torch\n", tmp_path)
    assert result.returncode != 0 and "torch is blocked in this test" in result.stderr


def test_doctor_never_imports_torch_even_when_installed(tmp_path, dist):
    result = python(IMPORT_ALL_RUNTIME, tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("script", "module"), [("hbi-run", "hbi_runtime.cli"), ("hbi-export", "hbi_export.cli"),
                                                ("hbi-train", "hbi_training.cli")])
def test_console_scripts_and_python_m_show_help(tmp_path, dist, script, module):
    for command in (console_script(script, module), [sys.executable, "-m", module]):
        result = run([*command, "--help"], tmp_path)
        assert result.returncode == 0, f"{command} --help failed:\n{result.stderr}"
        assert "Usage:" in result.stdout


def test_hbi_run_doctor_json(tmp_path, dist):
    result = run([*console_script("hbi-run", "hbi_runtime.cli"), "doctor", "--format", "json"], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == "hbi.doctor/1"
    assert report["toolkit"]["version"] == dist.version


def test_metadata(dist):
    import hbi_runtime

    assert dist.version == hbi_runtime.__version__ == "0.1.0"
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"hbi-export": "hbi_export.cli:main", "hbi-run": "hbi_runtime.cli:main",
                       "hbi-train": "hbi_training.cli:main"}
    base = [r for r in dist.requires or [] if "extra ==" not in r]
    assert not [r for r in base if r.startswith("torch")], f"torch must not be a base dependency: {base}"


def test_installed_names_do_not_collide(tmp_path, dist, repo_root):
    code = (
        "import importlib.util, hbi_export, hbi_runtime, hbi_training, hbi_calibration\n"
        "spec = importlib.util.find_spec('training')\n"
        "print(spec.origin if spec else '')\n"
    )
    result = python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    stray = result.stdout.strip()
    assert not stray or Path(stray).resolve() != (repo_root / "training" / "__init__.py").resolve(), (
        "the repository's training/ is importable as top-level 'training'; it must only be 'hbi_training'")


def _expected_wheel_files(source: Path) -> set[str]:
    expected = set()
    for folder, installed in PACKAGE_DIRS.items():
        for path in (source / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                expected.add(f"{installed}/{path.relative_to(source / folder).as_posix()}")
    return expected


def _copy_source(repo_root: Path, dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    dest.mkdir()
    for path in repo_root.iterdir():
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, dest / path.name)
    for folder in PACKAGE_DIRS:
        shutil.copytree(repo_root / folder, dest / folder, ignore=ignore)
    return dest


def test_wheel_ships_every_package_file_under_its_installed_name(tmp_path, repo_root):
    source = _copy_source(repo_root, tmp_path / "src")  # build a copy: a build writes build/ and *.egg-info
    out = tmp_path / "wheel"
    build = run([sys.executable, "-c", "import sys, setuptools.build_meta as b; b.build_wheel(sys.argv[1])",
                 str(out)], source, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_expected_wheel_files(source) - names)
    assert not missing, (
        f"files missing from the wheel: {missing}. A new subpackage needs a line in pyproject.toml "
        "[tool.setuptools] packages (under its installed name); a data file needs a pattern in package-data")
    tops = {name.split("/")[0] for name in names}
    assert tops == set(PACKAGE_DIRS.values()) | {f"hbi_toolkit-{wheel.name.split('-')[1]}.dist-info"}, tops
