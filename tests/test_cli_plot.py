"""`kimi-rotate stats --plot`: in-process with a pinned clock, plus real runs for narrow and ASCII-only output."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from test_cli_terminal import console
from typer.testing import CliRunner

from kimi_rotator import cli, cli_plot
from kimi_rotator.models import Outcome, OutcomeKind, Surface
from kimi_rotator.store import Attempt, NewKey
from kimi_rotator.store_sqlite import SqliteStore
from kimi_rotator.symbols import FANCY

NOW = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC
HOUR = 3600.0
runner = CliRunner()


@pytest.fixture(autouse=True)
def pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_now", lambda: NOW)
    monkeypatch.setattr(cli_plot, "symbols", lambda: FANCY)  # symbols() is decided once per process


def seed(home: Path, now: float = NOW) -> None:
    with contextlib.closing(SqliteStore(home)) as store:
        added, _ = store.add_keys(
            [NewKey(secret=f"sk-kimi-plotCli{i:017d}", name=n, surface=Surface.KIMI_CODE)
             for i, n in enumerate(["main", "spare"])], NOW)
        a, b = (k.id for k in added)
        store.record([
            *[Attempt(a, Outcome(kind=OutcomeKind.SUCCESS), now - 2 * HOUR) for _ in range(4)],
            *[Attempt(a, Outcome(kind=OutcomeKind.SUCCESS), now) for _ in range(6)],
            *[Attempt(a, Outcome(kind=OutcomeKind.RATE_LIMITED, until=now + 1), now) for _ in range(2)],
            Attempt(b, Outcome(kind=OutcomeKind.SUCCESS), now - 86_400),
        ])


def plot(*args: str, columns: int = 60) -> list[str]:
    result = runner.invoke(cli.app, ["stats", *args], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return str(result.stdout).splitlines()


def test_empty_store_and_no_requests(kimi_home: Path) -> None:
    assert plot("--plot") == ["No keys configured.", "Add one with: kimi-rotate add-key"]
    with contextlib.closing(SqliteStore(kimi_home)) as store:
        store.add_keys([NewKey(secret="sk-kimi-plotCliIdle0000000001", name="idle", surface=Surface.KIMI_CODE)], NOW)
    assert plot("--plot") == ["No requests recorded in the last 24 hours (UTC)."]


def test_hours_and_days(kimi_home: Path) -> None:
    seed(kimi_home)
    assert plot("--hours", "3") == [
        "Requests per key, last 3 hours (UTC, oldest left, one hour a",
        "column); a full bar is 8 requests. Below a bar: · some were",
        "429s, ! 10% or more were.",
        "",
        "        15:00  requests   429s",  # the time reaches over the labels: 3 bars are too few for it
        "[0] main  ▄ █        12      2",
        "            !",  # 2 of 8 were 429s
        "[1] spare             0      0",  # its request was yesterday
    ]
    assert plot("--plot", "--days", "2")[4:] == [
        "       06-15  requests   429s",
        "[0] main   █        12      2",
        "           !",
        "[1] spare ▁          1      0",  # one scale: 1 of 12 is the lowest bar, not none
    ]


def test_the_chart_fits_the_terminal(kimi_home: Path) -> None:
    seed(kimi_home)
    for columns in (40, 80, 200):
        lines = plot("--plot", "--hours", "336", columns=columns)
        assert all(len(line) <= columns for line in lines), columns
        assert any(line.startswith("[0] main") for line in lines)


def test_usage_errors(kimi_home: Path) -> None:
    for args in (["--plot", "--hours", "2", "--days", "2"], ["--plot", "--json"], ["--hours", "337"]):
        result = runner.invoke(cli.app, ["stats", *args])
        assert result.exit_code == 2, args
        assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("encoding", ["ascii", "cp1252"])
def test_a_narrow_ascii_terminal(tmp_path: Path, encoding: str) -> None:
    seed(tmp_path / "home", time.time())  # a real run reads the real clock
    done = console(tmp_path / "home", "stats", "--plot", "--hours", "48", PYTHONIOENCODING=encoding, COLUMNS="36")
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    text = done.stdout.decode("ascii")
    assert all(len(line) <= 36 for line in text.splitlines())
    assert "[0] main" in text and "a full bar" in text
