"""Fixtures shared by the test modules. Keep this small: module-specific helpers live in their module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kimi_rotator.store import HOME_ENV, Store


@pytest.fixture
def kimi_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private store folder (not created yet) that KIMI_ROTATE_HOME points at for the test's duration."""
    home = tmp_path / "kimi-home"
    monkeypatch.setenv(HOME_ENV, str(home))
    return home


@pytest.fixture
def store(kimi_home: Path) -> Iterator[Store]:
    """An open, empty store in `kimi_home`."""
    s = Store(kimi_home)
    yield s
    s.close()
