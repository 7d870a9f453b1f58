"""``hbi-train qa``: the QA demo (train + export + accuracy), question files from the synthetic set, export."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_runtime.cli_support import emit_json, guarded

qa_app = typer.Typer(name="qa", help="Video QA: train the demo QA model, write question files, export packages.",
                     no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                     rich_markup_mode=None)


@qa_app.command(epilog="Examples:\n\n  hbi-train qa demo --data /tmp/syn --out /tmp/qa-run\n\n"
                       "  hbi-train qa demo --data /tmp/syn --out /tmp/qa-run --steps 500 --artifacts /tmp/qa-demo")
def demo(
    data: Annotated[Path, typer.Option(help="Synthetic set folder (generated, or reused when identical).",
                                       show_default=False)],
    out: Annotated[Path, typer.Option(help="Run folder: weights, test_questions.csv, report.json.",
                                      show_default=False)],
    artifacts: Annotated[Optional[Path], typer.Option(
        help="Where the demo QA package goes (default: hbi_runtime/data/demo/qa); an earlier QA demo folder there is "
             "replaced, any other non-empty folder refused.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Training steps (recipe default).",
                                                 show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Data and training seed.")] = 0,
    trained: Annotated[Optional[Path], typer.Option(
        help="A finished run folder (with final/ and summary.json): export and evaluate it, no training.",
        show_default=False)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Train the demo QA model on the synthetic set, export its package (parity) and measure held-out accuracy."""
    with guarded(json_mode=json_output):
        from dataclasses import replace

        from hbi_training.qa import QA_DEMO_DIR, QARecipe, run_demo

        recipe = QARecipe() if steps is None else replace(QARecipe(), steps=steps)
        report = run_demo(data, out, artifacts=artifacts or QA_DEMO_DIR, recipe=recipe, seed=seed,
                          trained=trained)
        if json_output:
            emit_json({"schema": "hbi.train-qa-demo/1", **report})
        else:
            acc = report["package_accuracy"]
            sys.stdout.write(f"held-out QA accuracy (package, runtime): top-1 {100 * acc['top1']:.1f} %, top-5 "
                             f"{100 * acc['top5']:.1f} % over {acc['questions']} questions\n")


@qa_app.command(epilog="Examples:\n\n  hbi-train qa questions --data /tmp/syn --split test --out q.csv\n\n"
                       "  hbi-run qa --questions q.csv")
def questions(
    data: Annotated[Path, typer.Option(help="Synthetic set folder.", show_default=False)],
    out: Annotated[Path, typer.Option(help="CSV to write (video,question,answer).", show_default=False)],
    split: Annotated[str, typer.Option(help="train or test.")] = "test",
) -> None:
    """Write the questions (with answers) of a synthetic split for `hbi-run qa --questions`."""
    with guarded():
        from hbi_runtime.errors import UsageError
        from hbi_training.qa import write_questions_csv

        if split not in ("train", "test"):
            raise UsageError(f"--split must be train or test, got {split!r}")
        n = write_questions_csv(data, split, out)
        sys.stdout.write(json.dumps({"questions": n, "file": str(out)}) + "\n")


def register(app: typer.Typer) -> None:
    """Add ``hbi-train qa ...`` (demo, questions, export) to ``app``."""
    from hbi_export.tasks.qa_cli import register as register_export

    register_export(qa_app, "export")
    app.add_typer(qa_app, name="qa")
