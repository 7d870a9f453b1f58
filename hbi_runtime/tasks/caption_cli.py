"""The caption commands of ``hbi-run``: ``caption`` (captions, or answers with ``--question``) and ``eval-caption``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_runtime.cli_options import (AllowUnverifiedOption, FormatOption, TableFormatOption, WorkersOption,
                                     Steps, deprecated, run_guarded, strict_option)
from hbi_runtime.cli_support import OutputFormat, TableFormat, csv_text, emit_json, json_text
from hbi_runtime.names import display_path, printable

CAPTION_SCHEMA = "hbi.caption/1"
EVAL_SCHEMA = "hbi.eval-caption/1"


CaptionModelOption = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="Caption package folder (default: the demo decoder, when installed).",
    show_default=False)]
CaptionModelAlias = Annotated[Optional[Path], typer.Option("--caption-model", hidden=True,
                                                           help="Deprecated: --model.")]
RetrievalOption = Annotated[Optional[Path], typer.Option(
    "--retrieval-model", help="Retrieval package the caption package was trained on (default: the path in its "
                              "manifest). Its hash must match.", show_default=False)]
BeamOption = Annotated[int, typer.Option("--beam-size", help="1 = greedy search.")]
MaxLengthOption = Annotated[int, typer.Option("--max-length", help="Most generated tokens (EOS included).")]
PenaltyOption = Annotated[float, typer.Option("--length-penalty",
                                              help="Beam ranking: logprob / length ** penalty.")]
NgramOption = Annotated[int, typer.Option("--no-repeat-ngram", help="Forbid repeating n-grams of this size "
                                                                    "(0 = off).")]


def _caption_package(model: Optional[Path], alias: Optional[Path]) -> Optional[Path]:
    if alias is not None:
        deprecated("--caption-model", "--model")
    return model or alias


def _options(beam_size: int, max_length: int, length_penalty: float, no_repeat_ngram: int):
    from hbi_runtime.tasks.generate import SearchOptions

    return SearchOptions(beam_size=beam_size, max_length=max_length, length_penalty=length_penalty,
                         no_repeat_ngram=no_repeat_ngram)


def _load(caption_model, retrieval_model, allow_unverified):
    from hbi_runtime.tasks.caption import load_caption

    return load_caption(caption_model, retrieval=retrieval_model, allow_unverified=allow_unverified)


def _check_files(paths: list[Path]) -> None:
    from hbi_runtime.errors import BadInputError

    for p in paths:
        if not p.exists():
            raise BadInputError(f"video {p} does not exist", hint="check the path")
        if p.is_dir():
            raise BadInputError(f"{p} is a folder, not a video file", hint=f"pass the files, e.g. {p}/*.mp4")


def _render(rows: list[dict], fmt: TableFormat, header: dict) -> str:
    if fmt is TableFormat.json:
        return json_text({**header, "results": rows}) + "\n"
    if fmt is TableFormat.jsonl:
        return "".join(json_text({**header, **r}, indent=None) + "\n" for r in rows)
    keys = ["path", "question", "text", "tokens", "logprob", "score", "error"]  # the JSON rows' fields
    if fmt is TableFormat.csv:
        def cell(value):
            return "" if value is None else " ".join(map(str, value)) if isinstance(value, list) else value

        return csv_text(keys, ([cell(r.get(k)) for k in keys] for r in rows))
    lines = []
    for r in rows:
        name = display_path(os.path.basename(r["path"]))
        if r.get("error"):
            lines.append(f"{name}: FAILED ({printable(r['error'])})")
        elif r.get("question"):
            lines.append(f"{name}: Q: {printable(r['question'])}  A: {r['text']}")
        else:
            lines.append(f"{name}: {r['text']}")
    return "\n".join(lines) + "\n"


def register(app: typer.Typer) -> None:
    """Add ``caption`` and ``eval-caption`` to ``app``."""

    @app.command("caption", epilog=(
        "Examples:\n\n  hbi-run caption clip1.mp4 clip2.mp4\n\n"
        "  hbi-run caption clip.mp4 --beam-size 3 --no-repeat-ngram 3 --format json\n\n"
        "  hbi-run caption clip.mp4 --question \"what happens first?\"\n\n"
        "  hbi-run caption clips/*.mp4 --model pkg/caption --format csv > captions.csv"))
    def caption(
        ctx: typer.Context,
        videos: Annotated[list[Path], typer.Argument(help="Video files.", show_default=False)],
        question: Annotated[Optional[str], typer.Option(
            "--question", "-q", help="Answer this question about every video (open-ended QA) instead of "
                                     "captioning.", show_default=False)] = None,
        caption_model: CaptionModelOption = None,
        caption_model_alias: CaptionModelAlias = None,
        retrieval_model: RetrievalOption = None,
        beam_size: BeamOption = 1,
        max_length: MaxLengthOption = 40,
        length_penalty: PenaltyOption = 1.0,
        no_repeat_ngram: NgramOption = 0,
        workers: WorkersOption = 1,
        strict: strict_option("Exit 3 when any file failed.") = False,
        allow_unverified: AllowUnverifiedOption = False,
        output_format: TableFormatOption = TableFormat.table,
    ) -> None:
        """Caption videos (or answer --question about them) with the encoder-decoder on the retrieval backbone.

        The video side comes from the retrieval package's video encoder; the decoder cross-attends to its entity,
        action and event tokens. Greedy by default; --beam-size for beam search. Bad files are reported and
        never stop the run.
        """
        json_mode = output_format.is_json
        failed = False
        with run_guarded(ctx, output_format):
            options = _options(beam_size, max_length, length_penalty, no_repeat_ngram)
            _check_files(videos)
            with _load(_caption_package(caption_model, caption_model_alias), retrieval_model,
                       allow_unverified) as model:
                questions = None if question is None else [question] * len(videos)
                with Steps(enabled=not json_mode) as say:
                    say(f"captioning {len(videos)} video(s)")
                    results, errors = model.caption_videos(videos, questions, options, workers=workers)
                rows = [{"path": r.path, "question": r.question, "text": r.text, "tokens": list(r.tokens),
                         "logprob": round(r.logprob, 6), "score": round(r.score, 6), "error": None}
                        for r in results]
                rows += [{"path": str(e.path) if getattr(e, "path", None) else "?", "question": question,
                          "text": None, "error": str(getattr(e, "message", e))} for e in errors]
                header = {"schema": CAPTION_SCHEMA, "caption_package_sha256": model.manifest.sha256,
                          "model_sha256": model.retrieval.package.manifest_sha256,
                          "search": {"beam_size": beam_size, "max_length": max_length,
                                     "length_penalty": length_penalty, "no_repeat_ngram": no_repeat_ngram}}
                failed = bool(errors)
            sys.stdout.write(_render(rows, output_format, header))
            if failed and not json_mode:
                sys.stderr.write(f"{len(errors)} of {len(videos)} file(s) failed\n")
        if strict and failed:
            raise SystemExit(3)

    @app.command("eval-caption", epilog=(
        "Examples:\n\n  hbi-run eval-caption --captions data/test.csv --videos data\n\n"
        "  hbi-run eval-caption --captions refs.json --videos clips --beam-size 3 --format json"))
    def eval_caption(
        ctx: typer.Context,
        captions: Annotated[Path, typer.Option(
            "--captions", help="Reference captions: CSV with columns video,caption (one row per reference) or "
                               "JSON {video: [captions]}.", show_default=False)],
        videos: Annotated[Path, typer.Option("--videos", help="Folder the video paths are relative to.",
                                             show_default=False)],
        caption_model: CaptionModelOption = None,
        caption_model_alias: CaptionModelAlias = None,
        retrieval_model: RetrievalOption = None,
        beam_size: BeamOption = 1,
        max_length: MaxLengthOption = 40,
        length_penalty: PenaltyOption = 1.0,
        no_repeat_ngram: NgramOption = 0,
        workers: WorkersOption = 1,
        allow_unverified: AllowUnverifiedOption = False,
        output_format: FormatOption = OutputFormat.text,
    ) -> None:
        """Caption every referenced video and score the captions: BLEU-4, ROUGE-L, CIDEr-D (METEOR: not offline)."""
        json_mode = output_format is OutputFormat.json
        with run_guarded(ctx, json_mode):
            from hbi_runtime.tasks.caption import evaluate_captions, read_references

            options = _options(beam_size, max_length, length_penalty, no_repeat_ngram)
            refs = read_references(captions, videos)
            with _load(_caption_package(caption_model, caption_model_alias), retrieval_model,
                       allow_unverified) as model:
                with Steps(enabled=not json_mode) as say:
                    report = evaluate_captions(model, refs, options, workers=workers, progress=say)
                report = {"schema": EVAL_SCHEMA, "caption_package_sha256": model.manifest.sha256,
                          "model_sha256": model.retrieval.package.manifest_sha256, **report}
            if json_mode:
                emit_json(report)
            else:
                m = report["metrics"]
                sys.stdout.write(
                    f"videos: {report['videos']} captioned, {len(report['failed'])} failed\n"
                    f"BLEU-4   {m['bleu4']:.4f}\nROUGE-L  {m['rouge_l']:.4f}\nCIDEr-D  {m['cider_d']:.4f}\n"
                    f"METEOR   n/a ({m['meteor_note']})\n")
