"""``hbi-run``: the torch-free command line of hbi-toolkit.

Commands are thin: each parses its options and hands off to one library function inside
:func:`hbi_runtime.cli_support.guarded`, which turns errors into a message, a hint and an exit code.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from typing import Annotated, Optional

import typer

from hbi_runtime import __version__, doctor as doctor_lib
from hbi_runtime.cli_support import emit_json, guarded


class OutputFormat(str, enum.Enum):
    text = "text"
    json = "json"


@dataclass(frozen=True)
class GlobalOptions:
    debug: bool = False


FormatOption = Annotated[
    OutputFormat,
    typer.Option("--format", "-f", case_sensitive=False,
                 help="Output format: text for people, json for scripts (carries a \"schema\" key)."),
]

app = typer.Typer(
    name="hbi-run",
    help="Run HBI video-text retrieval models without torch (ONNX Runtime / TensorRT).",
    epilog="Examples:\n\n  hbi-run doctor\n\n  hbi-run --debug doctor --format json",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        sys.stdout.write(f"hbi-run {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of any error.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version_callback, is_eager=True,
                                                    help="Print the toolkit version and exit.")] = None,
) -> None:
    """Run HBI video-text retrieval models without torch (ONNX Runtime / TensorRT)."""
    ctx.obj = GlobalOptions(debug=debug)


@app.command(epilog="Examples:\n\n  hbi-run doctor\n\n  hbi-run doctor --format json > doctor.json")
def doctor(ctx: typer.Context, output_format: FormatOption = OutputFormat.text) -> None:
    """Report the toolkit, Python, platform, numpy and each optional backend.

    Backends: onnxruntime (with its execution providers), tensorrt, torch (looked up, never imported),
    decord and av (video decoding). Exit code 0 whatever is missing: this command only reports.
    """
    json_mode = output_format is OutputFormat.json
    with guarded(json_mode=json_mode, debug=ctx.obj.debug):
        report = doctor_lib.collect()
        if json_mode:
            emit_json(report)
        else:
            sys.stdout.write(doctor_lib.render_text(report))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``hbi-run``); ``argv`` defaults to ``sys.argv[1:]``."""
    app(args=argv, prog_name="hbi-run")


if __name__ == "__main__":
    main()
