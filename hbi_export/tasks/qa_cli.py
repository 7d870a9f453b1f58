"""``qa-export``: a QA checkpoint becomes a QA model package (register into hbi-export and hbi-train qa)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_runtime.cli_options import (DebugAlias, FormatOption, JsonAlias, Steps, output_format, overwrite_option,
                                     parse_levels, run_guarded)
from hbi_runtime.cli_support import OutputFormat, emit_json

HELP = ("Export a QA model (official MSRVTT-QA layout, or an hbi-toolkit QA folder) to a QA model package; parity "
        "against PyTorch is checked and recorded in the package (exit code 5 when it fails). On a terminal each step "
        "is shown on stderr.")
EPILOG = ("Examples:\n\n"
          "  hbi-export qa-export --checkpoint pytorch_model.bin.4 --out qa_pkg\n\n"
          "  hbi-export qa-export --checkpoint runs/qa/final --out qa_pkg --format json\n\n"
          "  hbi-export qa-export --checkpoint runs/qa/final --out qa_pkg --max-words 16")


def qa_export(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", help="Official main_vqa.py checkpoint, or an hbi-toolkit QA folder.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The QA package folder to write.", show_default=False)],
    answers: Annotated[Optional[Path], typer.Option(
        "--answers", help="Answer vocabulary {answer: id} (official data/MSR-VTT/qa/train_ans2label.json). "
                          "Default: the checkpoint folder's answers.json.", show_default=False)] = None,
    max_words: Annotated[int, typer.Option("--max-words", help="Question length L (official MSRVTT-QA: 32).")] = 32,
    max_frames: Annotated[int, typer.Option("--max-frames", help="Frames per video T (official MSRVTT-QA: 12).")]
    = 12,
    levels: Annotated[Optional[str], typer.Option(
        "--levels", help="Answer-logit level weights entity,action,event. Default: the checkpoint's own, else "
                         "0.4,0.4,0.2 (official MSRVTT-QA).", show_default=False)] = None,
    overwrite: overwrite_option("a QA package") = False,
    fmt: FormatOption = OutputFormat.text,
    json_alias: JsonAlias = False,
    debug: DebugAlias = False,
) -> None:
    """Export a QA model (official MSRVTT-QA layout) to a QA package; parity is checked and recorded."""
    fmt = output_format(fmt, json_alias)
    json_mode = fmt is OutputFormat.json
    with run_guarded(ctx, json_mode, debug):
        weights = parse_levels(levels)
        from hbi_export.tasks.qa_export import export_qa_package
        from hbi_runtime.tasks.qa_package import load_qa_package

        with Steps(enabled=not json_mode) as say:
            _, parity = export_qa_package(checkpoint, out, answers_file=answers, answer_weights=weights,
                                          max_words=max_words, max_frames=max_frames, overwrite=overwrite,
                                          progress=say)
        pkg = load_qa_package(out, allow_unverified=True)
        summary = {"schema": "hbi.qa-export/1", "model_sha256": pkg.manifest_sha256, "package": str(out),
                   "status": pkg.manifest.status, "answers": len(pkg.answers),
                   "parity": parity.to_dict() if parity is not None else None}
        if json_mode:
            emit_json(summary)
        else:
            sys.stdout.write(f"wrote {out} ({len(pkg.answers)} answers), parity {pkg.manifest.status}\n")
        if parity is not None and not parity.ok:
            parity.raise_if_failed(hint="the package is marked failed; see its manifest.json")


def register(app: typer.Typer, name: str = "qa-export") -> None:
    """Add the export command to ``app`` (``hbi-export qa-export``; ``hbi-train qa export``, deprecated, forwards
    here)."""
    app.command(name, help=HELP, epilog=EPILOG)(qa_export)
