"""Cold start of ``hbi-run retrieve`` on the demo: a new process per run, the index prebuilt, the files in the page
cache (issue goal: <= 0.4 s wall).

What one run is: ``python -c "from hbi_runtime.cli import main; main()" retrieve QUERY --index IDX`` (what the
``hbi-run`` console script runs), the index of the demo's 8 sample videos built once by ``hbi-run index`` into a
temporary folder (or ``--index``), stdout to a pipe. Each is timed from outside: wall clock, and CPU time = user +
sys of the child (``RUSAGE_CHILDREN``). The toolkit runs from copies of ``hbi_runtime/`` (its ``data/`` linked)
first on ``PYTHONPATH``, in two byte-code settings:

* ``pyc``: ``PYTHONDONTWRITEBYTECODE`` unset, after a warm-up run that wrote the ``.pyc`` files: what an installed
  copy of the toolkit costs;
* ``no-pyc``: ``PYTHONDONTWRITEBYTECODE=1`` and a copy without ``__pycache__``: the toolkit's own modules compiled
  from source at every start, what an editable install costs on a machine that sets the variable, as this one
  does. Third-party packages keep the byte code their installer wrote in both.

``--baseline-rev REV`` adds the same runs of ``hbi_runtime/`` at that git revision (``git archive``), taking turns
with this one run by run, so that both meet the same load. Besides, per setting: ``python -c pass`` (the interpreter
and site, this environment's ``.pth`` files included) and ``python -c "import hbi_runtime.cli"``; and once, in one
process, where the time of one retrieve of this version goes (wall and CPU of import, argument parsing up to the
command's body, package check, tokenizer, ONNX Runtime import and session, index open, the rest; by wrapping those
functions; the caches of optimized graphs and BPE tables are warm, as for every run but a user's very first).

Output: medians and ranges, the load average before and after (the machine may be shared), and with ``--json PATH``
the same as JSON. Every run's stdout is compared with the first one's (the baseline's too): a run that answers
differently fails the benchmark.

Usage::

    python benchmarks/bench_cold_start.py [--runs 15] [--baseline-rev 6b6c53b] [--index IDX] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hbi_runtime

QUERY = "a red circle moving left"
PACKAGE_DIR = Path(hbi_runtime.__file__).resolve().parent
SAMPLES = PACKAGE_DIR / "data" / "demo" / "samples"

# Run in the child for the phase split: wraps the functions a retrieve goes through and reports exclusive times.
PHASES_CHILD = r"""
import json, sys, time
T0 = (time.perf_counter(), time.process_time())
spent, stack = {}, []
def now(): return (time.perf_counter(), time.process_time())
def enter(name): stack.append([name, now(), (0.0, 0.0)])
def leave():
    name, start, inner = stack.pop(); end = now()
    total = (end[0] - start[0], end[1] - start[1])
    own = spent.setdefault(name, [0.0, 0.0]); own[0] += total[0] - inner[0]; own[1] += total[1] - inner[1]
    if stack: stack[-1][2] = (stack[-1][2][0] + total[0], stack[-1][2][1] + total[1])
def wrap(owner, attr, name):
    fn = getattr(owner, attr)
    def wrapped(*a, **k):
        enter(name)
        try: return fn(*a, **k)
        finally: leave()
    setattr(owner, attr, wrapped)
enter("import hbi_runtime.cli")
import hbi_runtime.cli as cli
leave()
import hbi_runtime.package as package, hbi_runtime.tokenizer as tok, hbi_runtime.backends.onnxruntime as ob
wrap(package, "check_package_files", "package check (hashes)")
wrap(tok.ClipTokenizer, "__init__", "tokenizer")
wrap(ob, "import_onnxruntime", "import onnxruntime")
wrap(ob.OrtBackend, "_load", "onnxruntime session")
def first_call(module, attr, name):
    fn = getattr(module, attr)
    def marked(*a, **k):
        spent.setdefault(name, now())
        return fn(*a, **k)
    setattr(module, attr, marked)
first_call(cli, "run_guarded", "_parse_done")  # the command's body starts
import hbi_runtime.index as index_pkg
wrap(index_pkg.Index, "open", "index open")
enter("main")
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
leave()
end = now()
parse_done = spent.pop("_parse_done")
sys.stderr.write(json.dumps({"spent": spent, "parse": [parse_done[0] - T0[0], parse_done[1] - T0[1]],
                             "total": [end[0] - T0[0], end[1] - T0[1]]}) + "\n")
"""


def run_once(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, bytes]:
    """(wall s, CPU s = user + sys of the child, stdout) of one run, in ``cwd`` (``python -c`` puts the working
    folder first on sys.path: never a checkout's); a failed run stops the benchmark."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # accumulated over reaped children: take differences
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc.stdout


def summary(values: list[float]) -> dict:
    return {"median_ms": round(1000 * statistics.median(values), 1), "min_ms": round(1000 * min(values), 1),
            "max_ms": round(1000 * max(values), 1)}


def source_copy(package: Path, target: Path) -> Path:
    """A copy of the ``hbi_runtime`` folder ``package`` without byte code (its data/ linked to this one's) in
    ``target``; returns the folder to put on PYTHONPATH."""
    dest = target / "hbi_runtime"
    shutil.copytree(package, dest, ignore=shutil.ignore_patterns("__pycache__", "data"))
    (dest / "data").symlink_to(PACKAGE_DIR / "data", target_is_directory=True)
    return target


def baseline_tree(rev: str, target: Path) -> Path:
    """``hbi_runtime/`` at git revision ``rev``, extracted under ``target``."""
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "hbi_runtime"], check=True, capture_output=True,
                             cwd=PACKAGE_DIR.parent).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    tree = target / "hbi_runtime"
    # built extensions (the native scoring kernel) are not in git: this copy's, where their C source is the same
    for built in PACKAGE_DIR.rglob("*.so"):
        rel = built.relative_to(PACKAGE_DIR)
        source = rel.parent / (rel.name.split(".", 1)[0] + ".c")
        if (tree / source).is_file() and (tree / source).read_bytes() == (PACKAGE_DIR / source).read_bytes():
            shutil.copy2(built, tree / rel)
        else:
            print(f"note: the baseline runs without {rel} (its C source differs or is absent)")
    return tree


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="runs per setting (taking turns)")
    ap.add_argument("--index", type=Path, help="a prebuilt index of the demo samples (default: built here)")
    ap.add_argument("--baseline-rev", help="also run hbi_runtime/ of this git revision, taking turns")
    ap.add_argument("--no-phases", action="store_true", help="skip the in-process split")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hbi-cold-") as tmp:
        tmp = Path(tmp)
        base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        index_dir = args.index
        if index_dir is None:
            index_dir = tmp / "index"
            subprocess.run([sys.executable, "-m", "hbi_runtime.cli", "index", str(SAMPLES), "--index",
                            str(index_dir), "--format", "json"], env=base, cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
        versions = {"this": PACKAGE_DIR}
        if args.baseline_rev:
            versions["baseline"] = baseline_tree(args.baseline_rev, tmp / "baseline")
        settings = {}
        for version, package in versions.items():
            for setting in ("pyc", "no-pyc"):
                path = source_copy(package, tmp / version / setting)
                env = {**base, "PYTHONPATH": os.pathsep.join([str(path), *filter(None, [base.get("PYTHONPATH")])])}
                if setting == "no-pyc":
                    env["PYTHONDONTWRITEBYTECODE"] = "1"
                settings[f"{version} {setting}"] = env
        commands = {
            "interpreter": [sys.executable, "-c", "pass"],
            "import hbi_runtime.cli": [sys.executable, "-c", "import hbi_runtime.cli; print(hbi_runtime.__file__)"],
            "retrieve": [sys.executable, "-c", "from hbi_runtime.cli import main; main()", "retrieve", QUERY,
                         "--index", str(index_dir)],
        }
        # warm-up: byte code of the pyc settings, the caches (BPE tables, optimized graphs), the page cache
        for env in settings.values():
            for cmd in commands.values():
                run_once(cmd, env, tmp)
        load_before = os.getloadavg()
        times: dict = {s: {c: {"wall": [], "cpu": []} for c in commands} for s in settings}
        expected = None
        for _ in range(args.runs):
            for setting, env in settings.items():
                for name, cmd in commands.items():
                    wall, cpu, out = run_once(cmd, env, tmp)
                    times[setting][name]["wall"].append(wall)
                    times[setting][name]["cpu"].append(cpu)
                    if name == "import hbi_runtime.cli" and not out.decode().startswith(env["PYTHONPATH"]):
                        raise SystemExit(f"the {setting} setting ran {out.decode().strip()}, not its copy")
                    if name == "retrieve":
                        if expected is None:
                            expected = out
                        elif out != expected:
                            raise SystemExit(f"a run of the {setting} setting answered differently")
        load_after = os.getloadavg()
        phases = None
        if not args.no_phases:
            runs = []
            for _ in range(5):
                proc = subprocess.run([sys.executable, "-c", PHASES_CHILD, "retrieve", QUERY, "--index",
                                       str(index_dir)], env=settings["this pyc"], cwd=tmp, capture_output=True,
                                      check=True)
                runs.append(json.loads(proc.stderr.decode().strip().splitlines()[-1]))
            names = list(runs[0]["spent"])
            phases = {n: {"wall_ms": round(1000 * statistics.median(r["spent"][n][0] for r in runs), 1),
                          "cpu_ms": round(1000 * statistics.median(r["spent"][n][1] for r in runs), 1)}
                      for n in names}
            phases["argument parsing (Typer, pydantic)"] = {
                "wall_ms": round(1000 * statistics.median(r["parse"][0] - r["spent"]["import hbi_runtime.cli"][0]
                                                          for r in runs), 1),
                "cpu_ms": round(1000 * statistics.median(r["parse"][1] - r["spent"]["import hbi_runtime.cli"][1]
                                                         for r in runs), 1)}
            phases["in-process total"] = {"wall_ms": round(1000 * statistics.median(r["total"][0] for r in runs), 1),
                                          "cpu_ms": round(1000 * statistics.median(r["total"][1] for r in runs), 1)}
            phases["the rest (command imports, encoding, scoring, output)"] = phases.pop("main")

    result = {
        "schema": "hbi.bench-cold-start/1", "query": QUERY, "runs": args.runs,
        "baseline_rev": args.baseline_rev, "python": sys.version.split()[0],
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "goal_ms": 400,
        "settings": {s: {c: {"wall": summary(v["wall"]), "cpu": summary(v["cpu"])} for c, v in cmds.items()}
                     for s, cmds in times.items()},
        "phases": phases,
    }
    print(f"cold start of `hbi-run retrieve` on the demo, {args.runs} runs per setting, load "
          f"{result['load_before'][0]} -> {result['load_after'][0]} on {result['cpus']} CPU(s)")
    for setting, cmds in result["settings"].items():
        for name, r in cmds.items():
            print(f"  {setting:16s} {name:24s} wall {r['wall']['median_ms']:7.1f} ms ({r['wall']['min_ms']:.1f}-"
                  f"{r['wall']['max_ms']:.1f})  CPU {r['cpu']['median_ms']:7.1f} ms")
    if phases:
        print("  where one retrieve of this version goes (in-process, median of 5, pyc):")
        for name, p in phases.items():
            print(f"    {name:54s} wall {p['wall_ms']:7.1f} ms  CPU {p['cpu_ms']:7.1f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
