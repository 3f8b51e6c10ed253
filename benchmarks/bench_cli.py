"""How fast `kimi-rotate` starts: `--help`, `list-keys` (10 keys), `rotate` and `stats`, against the imports no
command can avoid.

Run: python benchmarks/bench_cli.py [--runs 15]   (about 40 s on 2 cores; run it with the project's interpreter:
`kimi-rotate` is looked up next to it)

The baseline is `python -c "import typer, pydantic, sqlite3, platformdirs"`. Every command and the baseline run as
fresh processes, interleaved (one of each per round), so that load on the machine hits all of them alike; the
table shows medians and the ratio of each command's median to the baseline's (target: at most 1.3x).

Two modes, both for the baseline and the commands:
  cached     bytecode caches exist (a warm-up run writes them), as on most machines.
  no cache   PYTHONDONTWRITEBYTECODE=1 and PYTHONPYCACHEPREFIX pointing at an empty folder, so that no cache is
             read either: every module (standard library included) is compiled from source at every start. The
             folder is checked to be still empty afterwards.
Neither mode writes into a source tree: the cached mode keeps its caches under a temporary PYTHONPYCACHEPREFIX too,
so the script can measure another checkout (run it with that checkout's `.venv/bin/python`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kimi_rotator.models import Surface
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore

TARGET = 1.3
BASELINE = "import typer, pydantic, sqlite3, platformdirs"


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("kimi-rotate")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from kimi_rotator.cli import main; main()"]


def make_store(home: Path, now: float) -> None:
    """10 fake keys in valid format; one cooling and one disabled, so that list-keys prints every kind of line."""
    keys = [
        NewKey(
            secret=f"sk-kimi-bench{i:02d}" + "x" * 30,
            name=f"Account {i + 1}",
            surface=Surface.KIMI_CODE,
            total_requests=100 + i,
            successful_requests=90 + i,
            rate_limited_requests=5,
            cooldown_until=now + 1800 if i == 3 else None,
            cooldown_reason="429 rate_limit_reached_error" if i == 3 else None,
            disabled_reason="401 invalid_authentication_error" if i == 7 else None,
        )
        for i in range(10)
    ]
    store = SqliteStore(home)
    try:
        store.add_keys(keys, now)
    finally:
        store.close()


def run_once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    return elapsed


def measure(cases: dict[str, list[str]], env: dict[str, str], runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, argv in cases.items():
            times[name].append(run_once(argv, env))
    return {name: statistics.median(ts) * 1000 for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="rounds per mode (default 15)")
    args = parser.parse_args()

    cli = cli_command()
    cases = {
        "baseline": [sys.executable, "-c", BASELINE],
        "--help": [*cli, "--help"],
        "list-keys": [*cli, "list-keys"],
        "rotate": [*cli, "rotate"],
        "stats": [*cli, "stats"],
    }
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        home, cached, empty = Path(tmp, "home"), Path(tmp, "pycache"), Path(tmp, "empty")
        empty.mkdir()
        make_store(home, time.time())
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        base_env.update(KIMI_ROTATE_HOME=str(home), COLUMNS="80")
        modes = {
            "cached": {**base_env, "PYTHONPYCACHEPREFIX": str(cached)},
            "no cache": {**base_env, "PYTHONPYCACHEPREFIX": str(empty), "PYTHONDONTWRITEBYTECODE": "1"},
        }
        for argv in cases.values():  # writes the cached mode's bytecode
            run_once(argv, modes["cached"])
        load_before = os.getloadavg()[0]
        results = {mode: measure(cases, env, args.runs) for mode, env in modes.items()}
        if any(empty.iterdir()):
            raise SystemExit(f"bytecode was written to {empty} in the no-cache mode; the figures are not valid")
        shutil.rmtree(home)

    print(f"kimi-rotate start-up: median of {args.runs} runs each, Python {sys.version.split()[0]}, "
          f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"baseline: python -c \"{BASELINE}\"; target: at most {TARGET}x the baseline\n")
    print(f"| {'command':<10} | {'cached':>8} | {'ratio':>7} | {'no cache':>8} | {'ratio':>7} |")
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 9}|")
    for name in cases:
        cells = []
        for mode in modes:
            ms = results[mode][name]
            ratio = ms / results[mode]["baseline"]
            mark = "" if name == "baseline" or ratio <= TARGET else " !"
            cells += [f"{ms:.0f} ms", f"{ratio:.2f}x{mark}"]
        print(f"| {name:<10} | {cells[0]:>8} | {cells[1]:>7} | {cells[2]:>8} | {cells[3]:>7} |")
    print("\n! = above the target")


if __name__ == "__main__":
    main()
