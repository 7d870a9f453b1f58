"""``qa-export``: a QA checkpoint becomes a QA model package (register into hbi-export and hbi-train qa)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_runtime.cli_support import emit_json, guarded

EPILOG = ("Examples:\n\n  hbi-export qa-export --checkpoint pytorch_model.bin.4 --answers train_ans2label.json "
          "--out qa_pkg\n\n  hbi-train qa export --checkpoint runs/qa/final --out qa_pkg --max-words 16 "
          "--max-frames 8 --format json")


def qa_export(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Option(help="Official main_vqa.py checkpoint, or an hbi-toolkit QA folder.",
                                             show_default=False)],
    out: Annotated[Path, typer.Option(help="The QA package folder to write.", show_default=False)],
    answers: Annotated[Optional[Path], typer.Option(
        help="Answer vocabulary {answer: id} (official data/MSR-VTT/qa/train_ans2label.json). Default: the "
             "checkpoint folder's answers.json.", show_default=False)] = None,
    max_words: Annotated[int, typer.Option(help="Question length L (official MSRVTT-QA: 32).")] = 32,
    max_frames: Annotated[int, typer.Option(help="Frames per video T (official MSRVTT-QA: 12).")] = 12,
    levels: Annotated[Optional[str], typer.Option(
        help="Answer-logit weights entity,action,event (official 0.4,0.4,0.2).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a QA package at --out (never the checkpoint or answers file; "
                                             "any other non-empty folder is refused).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary (schema hbi.qa-export/1).")]
    = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
) -> None:
    """Export a QA model (official MSRVTT-QA layout) to a QA package; parity is checked and recorded."""
    debug = debug or bool(getattr(ctx.obj, "debug", False))
    with guarded(json_mode=json_output, debug=debug):
        from hbi_export.tasks.qa_export import export_qa_package
        from hbi_runtime.tasks.qa_cli import _parse_weights
        from hbi_runtime.tasks.qa_package import load_qa_package

        progress = (lambda m: None) if json_output else (lambda m: sys.stderr.write(m + "\n"))
        _, parity = export_qa_package(checkpoint, out, answers_file=answers, answer_weights=_parse_weights(levels),
                                      max_words=max_words, max_frames=max_frames, overwrite=overwrite,
                                      progress=progress)
        pkg = load_qa_package(out, allow_unverified=True)
        summary = {"schema": "hbi.qa-export/1", "model_sha256": pkg.manifest_sha256, "package": str(out),
                   "status": pkg.manifest.status, "answers": len(pkg.answers),
                   "parity": parity.to_dict() if parity is not None else None}
        if json_output:
            emit_json(summary)
        else:
            sys.stdout.write(f"wrote {out} ({len(pkg.answers)} answers), parity {pkg.manifest.status}\n")
        if parity is not None and not parity.ok:
            parity.raise_if_failed(hint="the package is marked failed; see its qa_manifest.json")


def register(app: typer.Typer, name: str = "qa-export") -> None:
    """Add the export command to ``app`` (``hbi-export qa-export``; ``hbi-train qa export``)."""
    app.command(name, epilog=EPILOG)(qa_export)
