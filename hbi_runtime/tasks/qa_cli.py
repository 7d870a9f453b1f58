"""``hbi-run qa``: answer questions about videos with a QA model package (torch-free)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_runtime.cli_options import (AllowUnverifiedOption, LevelsOption, TableFormatOption, WorkersOption,
                                     parse_levels, run_guarded, strict_option)
from hbi_runtime.cli_support import TableFormat, csv_text, emit_json, json_text
from hbi_runtime.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED
from hbi_runtime.names import display_path, printable

DEMO_QA_PACKAGE = Path(__file__).resolve().parent.parent / "data" / "demo" / "qa" / "package"
SCHEMA = "hbi.qa/1"


def _rows(video: Optional[str], question: Optional[str], questions: Optional[Path]) -> list[tuple]:
    from hbi_runtime.errors import UsageError
    from hbi_runtime.tasks.qa import read_questions

    if questions is not None:
        if video is not None or question is not None:
            raise UsageError("give either VIDEO QUESTION or --questions FILE, not both")
        return read_questions(questions)
    if video is None or question is None:
        raise UsageError("give a video and a question, or --questions FILE",
                         hint='hbi-run qa clip.mp4 "what colour is the square?"')
    if not Path(video).is_file():
        from hbi_runtime.errors import BadInputError

        raise BadInputError(f"video {video} does not exist or is not a file")
    return [(video, question, None)]


def render(payload: dict, fmt: TableFormat) -> str:
    """The answered rows in one of the output formats (``payload`` = the JSON document)."""
    rows = payload["results"]
    if fmt is TableFormat.json:
        return json_text(payload) + "\n"
    if fmt is TableFormat.jsonl:
        head = {"schema": payload["schema"], "model_sha256": payload["model_sha256"]}
        return "".join(json_text({**head, **r}, indent=None, sort_keys=False) + "\n" for r in rows)
    if fmt is TableFormat.csv:
        return csv_text(["video", "question", "truncated", "rank", "answer", "probability", "expected", "correct"],
                        ([r["video"], r["question"], int(r["truncated"]), a["rank"], a["answer"], a["probability"],
                          r.get("expected", ""), "" if "correct" not in r else int(r["correct"])]
                         for r in rows for a in r["answers"]))
    lines = []
    for r in rows:
        mark = "" if "correct" not in r else ("  [ok]" if r["correct"] else f"  [expected {printable(r['expected'])}]")
        lines.append(f'{display_path(r["video"])}: "{printable(r["question"])}"{mark}'
                     + ("  (truncated)" if r["truncated"] else ""))
        lines += [f"  {a['rank']:>3}  {a['probability']:7.4f}  {a['answer']}" for a in r["answers"]]
    for f in payload["failed"]:
        lines.append(f'{display_path(f["video"])}: "{printable(f["question"])}": FAILED: {printable(f["reason"])}')
    acc = payload.get("accuracy")
    if acc:
        top1 = "-" if acc["top1"] is None else f"{100 * acc['top1']:.1f} %"
        top5 = "-" if acc["top5"] is None else f"{100 * acc['top5']:.1f} %"
        lines.append(f"accuracy: top-1 {top1}, top-5 {top5} over {acc['questions']} questions"
                     + (f" ({acc['out_of_vocabulary']} with answers outside the vocabulary left out)"
                        if acc["out_of_vocabulary"] else ""))
    return "\n".join(lines) + "\n"


def register(app: typer.Typer) -> None:
    """Add ``qa`` to ``app``."""

    @app.command("qa", epilog=(
        "Examples:\n\n  hbi-run qa clip.mp4 \"what colour is the square?\"\n\n"
        "  hbi-run qa clip.mp4 \"what does the circle do?\" --top-k 3 --model qa_pkg --format json\n\n"
        "  hbi-run qa --questions questions.csv --format csv > answers.csv\n\n"
        "questions.csv: a header video,question[,answer]; with an answer column the accuracy is reported "
        "(top-1 / top-5 over answers in the vocabulary, as the official MSRVTT-QA evaluation)."))
    def qa(
        ctx: typer.Context,
        video: Annotated[Optional[str], typer.Argument(help="A video file.", show_default=False)] = None,
        question: Annotated[Optional[str], typer.Argument(help="A question about it.", show_default=False)] = None,
        questions: Annotated[Optional[Path], typer.Option(
            "--questions", help="CSV file: video,question[,answer] (paths relative to the file).",
            show_default=False)] = None,
        model: Annotated[Optional[Path], typer.Option(
            "--model", "-m", help="QA package folder. Default: the demo QA model, when installed.",
            show_default=False)] = None,
        top_k: Annotated[int, typer.Option("--top-k", help="Answers per question.")] = 5,
        levels: LevelsOption = None,
        workers: WorkersOption = 2,
        strict: strict_option("Exit 3 when any video could not be decoded.") = False,
        min_accuracy: Annotated[Optional[float], typer.Option(
            "--min-accuracy", help="Exit 5 when top-1 accuracy (0..1) is below this.", show_default=False)] = None,
        allow_unverified: AllowUnverifiedOption = False,
        output_format: TableFormatOption = TableFormat.table,
    ) -> None:
        """Answer questions about videos (classifier over the package's answer vocabulary).

        Each video is decoded and encoded once, however many questions it has; answers come with probabilities.
        """
        json_mode = output_format.is_json
        failed = gate_failed = False
        with run_guarded(ctx, output_format):
            from hbi_runtime.errors import UsageError
            from hbi_runtime.tasks.qa import accuracy, load_qa

            rows = _rows(video, question, questions)
            weights = parse_levels(levels)
            pkg = model
            if pkg is None:
                from hbi_runtime.package import detect_kind

                if detect_kind(DEMO_QA_PACKAGE) != "qa":
                    raise UsageError("no QA package given", hint="pass --model QA_PKG (docs/qa.md)")
                pkg = DEMO_QA_PACKAGE
            with load_qa(pkg, allow_unverified=allow_unverified) as runtime:
                result = runtime.ask(rows, top_k=top_k, workers=workers, answer_weights=weights)
                payload = {"schema": SCHEMA, "model_sha256": runtime.package.manifest_sha256,
                           "model": str(pkg), "answer_weights": weights or list(
                               runtime.package.manifest.answer_weights),
                           "results": [r.to_dict() for r in result.rows], "failed": result.failed,
                           "accuracy": accuracy(result.rows, runtime.answers)}
            if len(rows) == 1 and result.failed:
                from hbi_runtime.errors import BadInputError

                raise BadInputError(f"{result.failed[0]['video']}: {result.failed[0]['reason']}")
            failed = bool(result.failed)
            acc = payload["accuracy"]
            if min_accuracy is not None and (acc is None or acc["top1"] is None):
                raise UsageError("--min-accuracy needs a --questions file with an answer column")
            gate_failed = min_accuracy is not None and acc["top1"] < min_accuracy
            if failed and not json_mode:
                sys.stderr.write(f"note: {len(result.failed)} question(s) skipped: their video could not be "
                                 "decoded\n")
            for r in result.rows:
                if r.truncated and not json_mode:
                    sys.stderr.write(f'warning: question "{printable(r.question[:60])}" was truncated to the model\'s '
                                     "text length\n")
            if output_format is TableFormat.json:
                emit_json(payload)
            else:
                sys.stdout.write(render(payload, output_format))
        if gate_failed:
            sys.stderr.write(f"error: top-1 accuracy {payload['accuracy']['top1']:.4f} is below --min-accuracy "
                             f"{min_accuracy}\n")
            raise SystemExit(EXIT_GATE_FAILED)
        if strict and failed:
            raise SystemExit(EXIT_BAD_INPUT)
