"""``hbi-run explain``: the Banzhaf interaction maps of one (query, video) pair (torch-free; docs/explain.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hbi_runtime.cli_options import (AllowUnverifiedOption, FormatOption, ModelOption, Steps, overwrite_option,
                                     run_guarded)
from hbi_runtime.cli_support import OutputFormat, emit_json
from hbi_runtime.explain.banzhaf import DEFAULT_SAMPLES, DEFAULT_SEED

DEMO_PACKAGE = Path(__file__).resolve().parent.parent / "data" / "demo" / "package"
JSON_NAME, HTML_NAME = "explain.json", "explain.html"

EPILOG = ("Examples:\n\n"
          "  hbi-run explain \"a red circle turns green\" clip.mp4\n\n"
          "  hbi-run explain \"a dog catches a frisbee\" clip.mp4 -m pkg/b32 --level entity --out why/\n\n"
          "  hbi-run explain \"a dog runs\" clip.mp4 --samples 8192 --format json > why.json\n\n"
          "--out DIR writes explain.json, explain.html (one self-contained page, every level) and a PNG heatmap per "
          "level (the PNGs need matplotlib, the `plot` extra). Interactions are estimated from --samples random "
          "coalitions (fixed --seed, a standard error per cell); small games are counted exactly.")


def _load(model: Optional[Path], allow_unverified: bool):
    """The package given, else the demo's (when installed)."""
    from hbi_runtime.errors import UsageError
    from hbi_runtime.model import load

    pkg = model if model is not None else DEMO_PACKAGE
    if model is None and not (pkg / "manifest.json").exists():
        raise UsageError("no model package given and no demo model installed",
                         hint="pass --model PKG (hbi-export onnx makes one from a checkpoint)")
    return load(pkg, allow_unverified=allow_unverified), pkg


def _write_folder(explanation, folder: Path, say) -> tuple[list[str], str | None]:
    """Write JSON, HTML and the PNGs into ``folder``; returns (files, why the PNGs are missing or None)."""
    from hbi_runtime.cli_support import json_text
    from hbi_runtime.errors import MissingDependencyError
    from hbi_runtime.explain.render import figure_class, write_html, write_png

    files = []
    (folder / JSON_NAME).write_text(json_text(explanation.to_dict()) + "\n", encoding="utf-8")
    files.append(JSON_NAME)
    say("writing the HTML page")
    write_html(explanation, folder / HTML_NAME)
    files.append(HTML_NAME)
    try:
        figure_class()
    except MissingDependencyError as exc:
        return files, exc.message
    for m in explanation.levels:
        say(f"drawing the {m.level} map")
        write_png(m, explanation, folder / f"{m.level}.png")
        files.append(f"{m.level}.png")
    return files, None


def register(app: typer.Typer) -> None:
    """Add ``explain`` to ``app``."""

    @app.command("explain", epilog=EPILOG)
    def explain(
        ctx: typer.Context,
        query: Annotated[str, typer.Argument(help="The text query.", show_default=False)],
        video: Annotated[Path, typer.Argument(help="A video file.", show_default=False)],
        model: ModelOption = None,
        level: Annotated[Optional[list[str]], typer.Option(
            "--level", help="entity, action or event; repeat for several. Default: every level the package "
                            "carries. (Level *weights* are --levels elsewhere.)", show_default=False)] = None,
        samples: Annotated[int, typer.Option(
            "--samples", help="Monte-Carlo coalitions per map (standard errors shrink as 1/sqrt).")] = DEFAULT_SAMPLES,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the coalitions.")] = DEFAULT_SEED,
        out: Annotated[Optional[Path], typer.Option(
            "--out", help="Folder for explain.json, explain.html and one PNG per level.", show_default=False)] = None,
        overwrite: overwrite_option("an explanation folder") = False,
        allow_unverified: AllowUnverifiedOption = False,
        output_format: FormatOption = OutputFormat.text,
    ) -> None:
        """Show which words cooperate with which moments of a video: the Banzhaf interaction map of the match,
        per level (entity: words x frames; action and event: the model's merged groups, with their words and
        time spans when the package records them)."""
        json_mode = output_format is OutputFormat.json
        png_missing = None
        with run_guarded(ctx, json_mode):
            from hbi_runtime.explain.explainer import check_samples, explain_pair
            from hbi_runtime.explain.render import text_report

            check_samples(samples)
            folder = None
            with Steps(enabled=not json_mode) as say:
                say("loading the model")
                m, pkg = _load(model, allow_unverified)
                with m:
                    if out is not None:
                        from hbi_runtime.outputs import prepare_output_dir

                        folder = prepare_output_dir(out, kind="explanation folder", inputs=[video, pkg],
                                                    overwrite=overwrite)
                    explanation = explain_pair(m, query, video, levels=level, samples=samples, seed=seed,
                                               progress=say)
                if folder is not None:
                    from hbi_runtime.outputs import staged_output_dir

                    with staged_output_dir(folder) as tmp:
                        files, png_missing = _write_folder(explanation, tmp, say)
                    explanation.extra["out"] = {"folder": str(folder), "files": files}
            if json_mode:
                doc = explanation.to_dict()
                if png_missing:
                    doc["warnings"] = [f"PNG heatmaps not written: {png_missing}"]
                emit_json(doc)
            else:
                sys.stdout.write(text_report(explanation))
                if folder is not None:
                    sys.stdout.write(f"wrote {', '.join(str(folder / f) for f in files)}\n")
            if explanation.truncated and not json_mode:
                sys.stderr.write("warning: the query is longer than the model's text length and was truncated\n")
        if png_missing:
            sys.stderr.write(f"error: PNG heatmaps not written: {png_missing}\n"
                             f"hint: pip install 'hbi-toolkit[plot]' (explain.json and explain.html were written; "
                             "--format json needs nothing more)\n")
            from hbi_runtime.errors import EXIT_USAGE

            raise SystemExit(EXIT_USAGE)
