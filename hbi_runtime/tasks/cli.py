"""Registers the task commands of ``hbi-run``: video QA (``qa_cli``), captioning (``caption_cli``) and the
interaction maps (``hbi_runtime.explain.cli``)."""

import typer

from hbi_runtime.explain import cli as explain_cli
from hbi_runtime.tasks import caption_cli, qa_cli


def register(app: typer.Typer) -> None:
    """Add the QA, captioning and explain commands to ``app``."""
    qa_cli.register(app)
    caption_cli.register(app)
    explain_cli.register(app)
