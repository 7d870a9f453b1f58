"""Fixtures shared by every test folder.

Tests run on CPU by default; tests marked ``gpu`` or ``trt`` are deselected unless asked for with ``-m``
(see ``[tool.pytest.ini_options]`` in pyproject.toml). Tests write only under ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator, fresh for each test, so that no test depends on another's draws."""
    return np.random.default_rng(20240607)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout the tests were collected from."""
    return REPO_ROOT
