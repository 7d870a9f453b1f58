"""The manifest of a generated synthetic set: its name, version and reader (shared by the generator and readers)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from hbi_runtime.errors import BadInputError

FORMAT = "hbi-synthetic"
VERSION = 1  # bump when the same config would render different videos or captions
MANIFEST = "manifest.json"
SPLITS = ("train", "test")

Progress = Callable[[str, int, int], None]  # progress(stage, done, total)


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a generated set.

    Raises:
        BadInputError: no manifest, or one this version does not read.
    """
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file", hint="run hbi_training.data.synthetic.generate first") \
            from None
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: cannot read it ({exc})", hint="generate the set again") from None
    if manifest.get("format") != FORMAT or manifest.get("config", {}).get("version") != VERSION:
        raise BadInputError(f"{path}: not a version-{VERSION} {FORMAT} manifest", hint="generate the set again")
    return manifest
