"""Check that the GPU extras of pyproject.toml resolve, with pip's dry run: nothing is installed.

For each extra (`gpu-cu12`, `gpu-cu13`, `jetson`) two kinds of check, each a `pip install --dry-run
--ignore-installed --report` that prints per extra either the versions it resolved to or the requirement that failed
and why:

* **host**: `pip install '.[EXTRA]'` as a user would type it, for this interpreter and machine. Without NVIDIA's
  index the `gpu-cu*` extras stop at `tensorrt-cu1x-libs`: on PyPI it is a "wheel-stub" sdist whose metadata step
  downloads the real wheel from https://pypi.nvidia.com (and fails where that is out of reach). Reported as
  "needs NVIDIA's index"; not an error of this check unless `--nvidia-index` was given.
* **target**: the extra's requirements (and the base dependencies) for each Python / machine the extra is for
  (x86-64 Linux, Python 3.10-3.12; Jetson: aarch64, Python 3.10 for JetPack 6 and 3.12 for JetPack 7), wheels only
  (`--only-binary=:all: --python-version --platform`). `tensorrt-cu1x` (an sdist whose only job is to require
  `-libs` and `-bindings`) is replaced by `tensorrt-cu1x-bindings` of the same versions, the part that is on PyPI, so
  that everything else is shown to resolve together with it. Caveat of pip's emulation: environment markers are still
  evaluated for the interpreter that runs pip, only the wheels' tags follow the target.

Every resolved set is checked for what a GPU extra must never bring: torch (engines are built without it) and the CPU
package onnxruntime (it installs the same `onnxruntime` module as onnxruntime-gpu).

What a dry run downloads: index pages, and for each candidate either its PEP 658 metadata file (where the index
serves one: pypi.org does for wheels, and a recent pip uses it) or the whole file. Sdists are always downloaded and
their metadata built (tensorrt-cu1x, a few kB; the local project), with their build requirements (setuptools,
wheel-stub). Each check reports what it fetched, from pip's -vv request lines (responses pip serves from its cache
are not counted): a check that fetched whole wheels ran against an index without metadata files or with an old
pip, and can cost GBs (onnxruntime-gpu alone is 300 MB, the nvidia-* CUDA libraries several hundred MB each).

    python benchmarks/check_extras.py                       # all extras, all targets (about 2-3 minutes)
    python benchmarks/check_extras.py --extra gpu-cu12 --no-targets
    python benchmarks/check_extras.py --nvidia-index        # manual check on a machine that reaches NVIDIA's index

Exit code 0 when every check came out as documented (docs/tensorrt.md, "Installing"), 1 otherwise. JSON goes to
benchmarks/results/extras.json (`--out`). Needs pip >= 22.2 (`--dry-run --report`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "hbi.check_extras/1"
NVIDIA_INDEX = "https://pypi.nvidia.com"
EXTRAS = ("gpu-cu12", "gpu-cu13", "jetson")


@dataclass(frozen=True)
class Target:
    """A platform the extra is installed on: CPython version, machine, newest manylinux glibc of its distribution."""

    python: str
    machine: str
    glibc: int  # minor of glibc 2.x: 35 = Ubuntu 22.04 (JetPack 6), 39 = Ubuntu 24.04 (JetPack 7)

    @property
    def name(self) -> str:
        return f"cp{self.python.replace('.', '')}-{self.machine}"

    def pip_args(self) -> list[str]:
        tags = [f"manylinux_2_{minor}_{self.machine}" for minor in range(self.glibc, 16, -1)]
        tags.append(f"manylinux2014_{self.machine}")
        return ["--only-binary=:all:", "--python-version", self.python, *(a for t in tags for a in ("--platform", t))]


X86 = [Target(python, "x86_64", 35) for python in ("3.10", "3.11", "3.12")]
TARGETS = {
    "gpu-cu12": X86,
    "gpu-cu13": X86,
    "jetson": [Target("3.10", "aarch64", 35), Target("3.12", "aarch64", 39)],
}
# Combinations that do not resolve, on purpose, and why (docs/tensorrt.md, "Installing").
UNSUPPORTED = {
    ("gpu-cu13", "cp310-x86_64"): "onnxruntime-gpu >= 1.27 (its CUDA 13 builds) has no Python 3.10 wheels",
}
# What no GPU extra may resolve to, and why.
FORBIDDEN = {
    "torch": "building engines and running them must not need torch",
    "onnxruntime": "the CPU package installs the same `onnxruntime` module as onnxruntime-gpu",
}
KEY_PACKAGES = re.compile(r"^(onnxruntime.*|tensorrt.*|cuda-.*|polygraphy|onnx|numpy|av|pillow|decord|nvidia-.*)$")
TENSORRT_META = re.compile(r"^(tensorrt-cu\d+)(?![-\w])(.*)$")  # tensorrt-cu12>=10.3,<11 (not -libs / -bindings)


@dataclass
class Check:
    """One pip dry run and what came of it."""

    extra: str
    target: str  # "host" or a Target name
    command: list[str]
    status: str = ""  # resolved | needs-nvidia-index | unsupported | failed
    ok: bool = False  # the outcome is the documented one
    packages: dict[str, str] = field(default_factory=dict)  # key packages only: name -> version
    package_count: int = 0
    forbidden: list[str] = field(default_factory=list)
    failure: dict[str, str] = field(default_factory=dict)  # requirement, reason, kind
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    downloaded: dict[str, int] = field(default_factory=dict)  # see downloads()


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canonical(match.group(1))


def load_project(root: Path = ROOT) -> dict:
    with open(root / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def extra_requirements(project: dict, extra: str) -> list[str]:
    """The requirements `pip install 'hbi-toolkit[EXTRA]'` asks for: base dependencies plus the extra's, with the
    project's own extras (`hbi-toolkit[gpu-cu12]`) expanded."""
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise KeyError(f"pyproject.toml has no extra {extra!r} (it has: {', '.join(sorted(extras))})")
    own = canonical(project["name"])
    out = list(project.get("dependencies", []))
    todo, seen = [extra], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in extras[name]:
            if requirement_name(req) == own:
                todo.extend(e.strip() for e in req[req.index("[") + 1:req.index("]")].split(","))
            elif req not in out:
                out.append(req)
    return out


def split_tensorrt(requirements: list[str], parts: tuple[str, ...] = ("bindings",)) -> tuple[list[str], list[str]]:
    """Replace each `tensorrt-cuNN<spec>` with `tensorrt-cuNN-<part><spec>` for the given parts; returns the new
    list and a note per replacement."""
    out, notes = [], []
    for req in requirements:
        match = TENSORRT_META.match(req.strip())
        if not match:
            out.append(req)
            continue
        name, rest = match.groups()
        replaced = [f"{name}-{part}{rest}" for part in parts]
        out.extend(replaced)
        notes.append(f"{req} checked as {' + '.join(replaced)} (tensorrt-cuNN is an sdist that only requires "
                     f"-libs and -bindings; -libs is on NVIDIA's index only)")
    return out, notes


def classify_failure(log: str) -> dict[str, str]:
    """The requirement pip stopped at and why, from its output: kind is one of nvidia-index, no-distribution,
    conflict, other."""
    lines = [line for line in log.splitlines() if "is ignored: it is neither a file nor a directory" not in line]
    text = "\n".join(lines)
    if "wheel_stub" in text and ("metadata-generation-failed" in text or "did not run successfully" in text):
        collecting = re.findall(r"^Collecting (\S+)", text, re.MULTILINE)
        stub = next((c for c in reversed(collecting) if "libs" in c), collecting[-1] if collecting else "?")
        return {"requirement": stub, "kind": "nvidia-index",
                "reason": f"a wheel-stub sdist on PyPI whose metadata step fetches the wheel from {NVIDIA_INDEX}"}
    match = re.search(r"Could not find a version that satisfies the requirement (\S+)(?: \(from versions: ([^)]*)\))?",
                      text)
    if match:
        versions = (match.group(2) or "").strip() or "none"
        if len(versions) > 160:
            versions = "..., " + versions[-150:].split(", ", 1)[-1]
        return {"requirement": match.group(1), "kind": "no-distribution",
                "reason": f"no wheel for this target (versions that have one: {versions})"}
    if "ResolutionImpossible" in text or "conflict is caused by" in text:
        causes = re.findall(r"^\s+(The user requested .*|\S+ \S+ depends on .*)$", text, re.MULTILINE)
        return {"requirement": "; ".join(c.strip() for c in causes[:4]) or "?", "kind": "conflict",
                "reason": "the requirements cannot all be met"}
    errors = [line.strip() for line in lines if line.strip().lower().startswith("error")]
    return {"requirement": "?", "kind": "other", "reason": (errors[-1] if errors else lines[-1] if lines else "")[:300]}


GET_LINE = re.compile(r'^\s*(https?://\S+?):\d+ "GET (\S+) HTTP/[\d.]+" (\d+) (\d+|None)', re.MULTILINE)


def downloads(log: str) -> dict[str, int]:
    """What pip fetched, from the request lines of its -vv output: bytes (and count) of index pages, PEP 658
    metadata files and whole files (wheels, sdists). Responses served from pip's cache make no request line."""
    out = {"index_bytes": 0, "metadata_bytes": 0, "metadata_files": 0, "file_bytes": 0, "files": 0, "largest_file": 0}
    for _host, path, status, size in GET_LINE.findall(log):
        if status != "200":
            continue
        n = int(size) if size != "None" else 0
        if "/simple/" in path or path.endswith("/simple"):
            out["index_bytes"] += n
        elif path.endswith(".metadata"):
            out["metadata_bytes"] += n
            out["metadata_files"] += 1
        else:
            out["file_bytes"] += n
            out["files"] += 1
            out["largest_file"] = max(out["largest_file"], n)
    return out


def run_pip(pip: list[str], args: list[str], cwd: Path) -> tuple[int, dict | None, str, float]:
    """`pip install --dry-run --ignore-installed --report -vv ARGS`: (rc, report or None, output, seconds)."""
    with tempfile.TemporaryDirectory(prefix="hbi-extras-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [*pip, "install", "--dry-run", "--ignore-installed", "--disable-pip-version-check", "-vv",
               "--report", str(report), *args]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False,
                              env={**os.environ, "PIP_NO_INPUT": "1"})
        seconds = time.monotonic() - t0
        data = json.loads(report.read_text()) if proc.returncode == 0 and report.exists() else None
    return proc.returncode, data, proc.stdout + proc.stderr, seconds


def judge(check: Check, rc: int, report: dict | None, log: str) -> None:
    """Fill status, packages, forbidden and failure of a check from pip's answer."""
    if rc == 0 and report is not None:
        resolved = {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}
        check.status = "resolved"
        check.package_count = len(resolved)
        check.packages = {name: version for name, version in sorted(resolved.items()) if KEY_PACKAGES.match(name)}
        check.forbidden = [f"{name} {resolved[name]}: {why}" for name, why in FORBIDDEN.items() if name in resolved]
        return
    check.failure = classify_failure(log)
    check.status = "needs-nvidia-index" if check.failure["kind"] == "nvidia-index" else "failed"


def check_host(pip: list[str], extra: str, nvidia: bool, extra_args: list[str]) -> Check:
    args = [*([f"--extra-index-url={NVIDIA_INDEX}"] if nvidia else []), *extra_args, f".[{extra}]"]
    check = Check(extra, "host", [*pip, "install", "--dry-run", "--ignore-installed", "--report", "-", *args])
    rc, report, log, check.seconds = run_pip(pip, args, ROOT)
    check.downloaded = downloads(log)
    judge(check, rc, report, log)
    expected = "resolved" if nvidia or extra == "jetson" else "needs-nvidia-index"
    check.ok = check.status == expected and not check.forbidden
    if check.status == "needs-nvidia-index":
        check.notes.append(f"documented: install with --extra-index-url {NVIDIA_INDEX}")
    return check


def check_target(pip: list[str], project: dict, extra: str, target: Target, nvidia: bool,
                 extra_args: list[str]) -> Check:
    parts = ("libs", "bindings") if nvidia else ("bindings",)
    requirements, notes = split_tensorrt(extra_requirements(project, extra), parts)
    with tempfile.TemporaryDirectory(prefix="hbi-extras-target-") as target_dir:
        # --target: old pips allow --platform/--python-version in a dry run only with it; nothing is written there
        args = [*target.pip_args(), "--target", target_dir,
                *([f"--extra-index-url={NVIDIA_INDEX}"] if nvidia else []), *extra_args, *requirements]
        check = Check(extra, target.name, [*pip, "install", "--dry-run", "--ignore-installed", "--report", "-",
                                           *[a if a != target_dir else "TMP" for a in args]], notes=notes)
        rc, report, log, check.seconds = run_pip(pip, args, ROOT)
    check.downloaded = downloads(log)
    judge(check, rc, report, log)
    why = UNSUPPORTED.get((extra, target.name))
    if why:
        check.notes.append(f"documented as unsupported: {why}")
        check.ok = check.status == "failed" and check.failure.get("kind") == "no-distribution"
        check.status = "unsupported" if check.ok else check.status
    else:
        check.ok = check.status == "resolved" and not check.forbidden
    return check


def pip_version(pip: list[str]) -> tuple[int, ...]:
    out = subprocess.run([*pip, "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(x) for x in re.match(r"pip (\d+)\.(\d+)", out).groups())


def describe(check: Check) -> str:
    head = f"{'ok ' if check.ok else 'BAD'} {check.extra:9s} {check.target:14s} {check.status}"
    got = check.downloaded
    cost = (f"({check.seconds:.0f} s; downloaded {got['files']} whole files {got['file_bytes'] / 1e6:.1f} MB, "
            f"{got['metadata_files']} metadata files, index pages {got['index_bytes'] / 1e6:.1f} MB)")
    lines = [f"{head} {cost}"]
    if check.status == "resolved":
        pkgs = ", ".join(f"{k} {v}" for k, v in check.packages.items() if not k.startswith("nvidia-"))
        nvidia = [f"{k} {v}" for k, v in check.packages.items() if k.startswith("nvidia-")]
        lines.append(f"      {check.package_count} packages: {pkgs}")
        if nvidia:
            lines.append(f"      CUDA libraries: {', '.join(nvidia)}")
    if check.failure:
        lines.append(f"      stops at {check.failure['requirement']}: {check.failure['reason']}")
    lines += [f"      FORBIDDEN {f}" for f in check.forbidden]
    lines += [f"      note: {n}" for n in check.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extra", action="append", choices=EXTRAS, help="check only this extra (repeatable)")
    parser.add_argument("--no-host", action="store_true", help="skip `pip install '.[EXTRA]'` on this machine")
    parser.add_argument("--no-targets", action="store_true", help="skip the per-Python / per-machine checks")
    parser.add_argument("--nvidia-index", action="store_true",
                        help=f"add --extra-index-url {NVIDIA_INDEX} (manual check: everything must then resolve; "
                             "pip may download the multi-GB -libs wheel where that index has no PEP 658 metadata)")
    parser.add_argument("--pip", default=f"{sys.executable} -m pip", help="pip command (default: %(default)s)")
    parser.add_argument("--pip-arg", action="append", default=[], help="extra argument for every pip run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "extras.json")
    args = parser.parse_args(argv)

    pip = args.pip.split()
    version = pip_version(pip)
    if version < (22, 2):
        parser.error(f"pip {'.'.join(map(str, version))} has no `install --dry-run --report`: needs pip >= 22.2")
    project = load_project()
    checks = []
    for extra in args.extra or EXTRAS:
        if not args.no_host:
            checks.append(check_host(pip, extra, args.nvidia_index, args.pip_arg))
            print(describe(checks[-1]), flush=True)
        for target in [] if args.no_targets else TARGETS[extra]:
            checks.append(check_target(pip, project, extra, target, args.nvidia_index, args.pip_arg))
            print(describe(checks[-1]), flush=True)
    result = {
        "schema": SCHEMA,
        "pip": ".".join(map(str, version)),
        "python": sys.version.split()[0],
        "nvidia_index": args.nvidia_index,
        "checks": [asdict(c) for c in checks],
        "ok": all(c.ok for c in checks),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    bad = [c for c in checks if not c.ok]
    print(f"\n{len(checks) - len(bad)} of {len(checks)} checks as documented; JSON: {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
