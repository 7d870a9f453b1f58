"""Registers the task commands of ``hbi-run``: video QA (``qa_cli``) and captioning (``caption_cli``)."""

import typer

from hbi_runtime.tasks import caption_cli, qa_cli


def register(app: typer.Typer) -> None:
    """Add the QA and captioning commands to ``app``."""
    qa_cli.register(app)
    caption_cli.register(app)
