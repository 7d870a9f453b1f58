"""``hbi-train qa``: the QA demo (train + export + accuracy) and question files from the synthetic set.

Exporting a QA checkpoint is ``hbi-export qa-export``; ``hbi-train qa export`` survives only as a hidden,
deprecated alias that forwards to it.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_runtime.cli_options import DebugAlias, FormatOption, JsonAlias, deprecated, output_format, run_guarded
from hbi_runtime.cli_support import OutputFormat, emit_json

qa_app = typer.Typer(name="qa", help="Video QA: train the demo QA model, write question files.",
                     no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                     rich_markup_mode=None)


class Split(str, enum.Enum):
    train = "train"
    test = "test"


@qa_app.command(epilog="Examples:\n\n  hbi-train qa demo --data /tmp/syn --out /tmp/qa-run\n\n"
                       "  hbi-train qa demo --data /tmp/syn --out /tmp/qa-run --steps 500 --artifacts /tmp/qa-demo "
                       "--format json")
def demo(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", help="Synthetic set folder (generated, or reused when identical).",
                                       show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: weights, test_questions.csv, report.json.",
                                      show_default=False)],
    artifacts: Annotated[Optional[Path], typer.Option(
        "--artifacts", help="Where the demo QA package goes (default: hbi_runtime/data/demo/qa); an earlier QA demo "
                            "folder there is replaced, any other non-empty folder refused.", show_default=False)]
    = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Training steps (recipe default).",
                                                 show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Data and training seed.")] = 0,
    trained: Annotated[Optional[Path], typer.Option(
        "--trained", help="A finished run folder (with final/ and summary.json): export and evaluate it, no training.",
        show_default=False)] = None,
    fmt: FormatOption = OutputFormat.text,
    json_alias: JsonAlias = False,
    debug: DebugAlias = False,
) -> None:
    """Train the demo QA model on the synthetic set, export its package (parity) and measure held-out accuracy."""
    json_mode = output_format(fmt, json_alias) is OutputFormat.json
    with run_guarded(ctx, json_mode, debug):
        from dataclasses import replace

        from hbi_training.progress import stages
        from hbi_training.qa import QA_DEMO_DIR, QARecipe, run_demo

        recipe = QARecipe() if steps is None else replace(QARecipe(), steps=steps)
        with stages(not json_mode) as say:
            report = run_demo(data, out, artifacts=artifacts or QA_DEMO_DIR, recipe=recipe, seed=seed,
                              trained=trained, progress=say, bar=say.enabled)
        if json_mode:
            emit_json({"schema": "hbi.train-qa-demo/1", **report})
        else:
            acc = report["package_accuracy"]
            typer.echo(f"held-out QA accuracy (package, runtime): top-1 {100 * acc['top1']:.1f} %, top-5 "
                       f"{100 * acc['top5']:.1f} % over {acc['questions']} questions")


@qa_app.command(epilog="Examples:\n\n  hbi-train qa questions --data /tmp/syn --split test --out q.csv\n\n"
                       "  hbi-train qa questions --data /tmp/syn --out q.csv --format json")
def questions(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", help="Synthetic set folder.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV to write (video,question,answer).",
                                      show_default=False)],
    split: Annotated[Split, typer.Option("--split", help="Which split's videos.")] = Split.test,
    fmt: FormatOption = OutputFormat.text,
    json_alias: JsonAlias = False,
    debug: DebugAlias = False,
) -> None:
    """Write the questions (with answers) of a synthetic split, for `hbi-run qa --questions FILE`."""
    json_mode = output_format(fmt, json_alias) is OutputFormat.json
    with run_guarded(ctx, json_mode, debug):
        from hbi_training.qa import write_questions_csv

        n = write_questions_csv(data, split.value, out)
        if json_mode:
            emit_json({"schema": "hbi.train-qa-questions/1", "questions": n, "file": str(out)})
        else:
            typer.echo(f"wrote {n} questions to {out}")


@qa_app.command("export", hidden=True, add_help_option=False, help="Deprecated: use `hbi-export qa-export`.",
                context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def export_alias(ctx: typer.Context) -> None:
    """``hbi-train qa export ARGS`` runs ``hbi-export qa-export ARGS`` (after a deprecation warning)."""
    deprecated("`hbi-train qa export`", "`hbi-export qa-export`")
    from hbi_export.tasks import qa_cli as export_qa_cli

    forward = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                          context_settings={"help_option_names": ["-h", "--help"]})
    forward.callback()(lambda: None)  # a group, so that the command keeps its name
    export_qa_cli.register(forward)
    typer.main.get_command(forward).main(["qa-export", *ctx.args], prog_name="hbi-export",
                                         obj=ctx.find_root().obj)


def register(app: typer.Typer) -> None:
    """Add ``hbi-train qa ...`` (demo, questions; the hidden deprecated export alias) to ``app``."""
    app.add_typer(qa_app, name="qa")
