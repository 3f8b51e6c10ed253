"""The CLI wherever it runs: what it imports at start-up, output that is not UTF-8, a store that cannot be written,
usage errors, and help in narrow terminals (a real pseudo-terminal).

Speed itself is measured by benchmarks/bench_cli.py, not here; these tests guard the structure it depends on.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kimi_rotator import backup, cli, opencode
from kimi_rotator.models import Surface
from kimi_rotator.store import HOME_ENV, NewKey
from kimi_rotator.store_sqlite import SqliteStore

NOW = time.time()
KEYS = [
    NewKey(secret="sk-kimi-testTerminalOne00000001", name="one", surface=Surface.KIMI_CODE),
    NewKey(secret="sk-kimi-testTerminalTwo00000002", name="two", surface=Surface.KIMI_CODE, health=55,
           cooldown_until=NOW + 1800, cooldown_reason="429 rate_limit_reached_error"),
    NewKey(secret="sk-kimi-testTerminalThree0000003", name="three", surface=Surface.KIMI_CODE,
           disabled_reason="401 invalid_authentication_error"),
]


def seeded(home: Path, *extra: NewKey) -> Path:
    store = SqliteStore(home)
    try:
        added, _ = store.add_keys([*KEYS, *extra], NOW)
        store.use_key(added[0].id)
    finally:
        store.close()
    return home


def console(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    script = Path(sys.executable).with_name("kimi-rotate")
    argv = [str(script)] if script.exists() else [sys.executable, "-c", "from kimi_rotator.cli import main; main()"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONIOENCODING", "LC_", "LANG"))}
    environment.update({HOME_ENV: str(home), **env})
    return subprocess.run([*argv, *args], capture_output=True, env=environment, timeout=60, check=False)


# -- start-up --------------------------------------------------------------------------------------------------------

HEAVY = ("cryptography", "mitmproxy", "ssl", "rich", "pydantic.main", "kimi_rotator.backup", "kimi_rotator.opencode",
         "kimi_rotator.doctor", "kimi_rotator.proxy")


@pytest.mark.parametrize("args", [[], ["--help"], ["list-keys"], ["rotate"], ["stats"], ["status"]])
def test_everyday_commands_import_nothing_heavy(tmp_path: Path, args: list[str]) -> None:
    """Backups (cryptography), the importer, the proxy and its checks (mitmproxy, ssl), rich and pydantic's model
    machinery cost 150-250 ms at every start-up; the commands people type every day load none of them."""
    seeded(tmp_path / "home")
    code = (
        "import sys, json\n"
        "from kimi_rotator import cli\n"
        f"sys.argv = ['kimi-rotate', *{args!r}]\n"
        "try:\n    cli.main() if len(sys.argv) > 1 else None\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    env = {**os.environ, HOME_ENV: str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    loaded = set(json.loads(done.stderr.strip().splitlines()[-1]))
    assert not [m for m in HEAVY if m in loaded], f"{args} imported {[m for m in HEAVY if m in loaded]}"


# -- output that is not UTF-8 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["cp1252", "ascii"])
def test_list_keys_and_stats_fall_back_to_plain_symbols(tmp_path: Path, encoding: str) -> None:
    home = seeded(tmp_path / "home")
    listing = console(home, "list-keys", PYTHONIOENCODING=encoding)
    stats = console(home, "stats", PYTHONIOENCODING=encoding)
    for done in (listing, stats):
        assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
        done.stdout.decode("ascii")  # every character plain
    text = listing.stdout.decode("ascii")
    for plain in ("* [0] one", "- [1] two", "+ Active", "~ Cooling (429", "x Disabled (401", "##########",
                  "######....", "sk-kimi-...0001"):
        assert plain in text, plain
    assert "Usage Statistics" in stats.stdout.decode("ascii") and "-" * 50 in stats.stdout.decode("ascii")
    rows = json.loads(console(home, "list-keys", "--json", PYTHONIOENCODING=encoding).stdout.decode("ascii"))
    assert rows[0]["masked_key"] == "sk-kimi-…0001"  # the same JSON, with \\u escapes


def test_cp1252_shows_what_it_can_and_replaces_the_rest(tmp_path: Path) -> None:
    home = seeded(tmp_path / "home", NewKey(secret="sk-kimi-testTerminalFour000004", name="Clé 東京",
                                            surface=Surface.KIMI_CODE))
    done = console(home, "list-keys", PYTHONIOENCODING="cp1252")
    assert done.returncode == 0, done.stderr
    assert "[3] Clé ??" in done.stdout.decode("cp1252")
    problem = console(home, "use-key", "nobody", PYTHONIOENCODING="cp1252:strict")
    assert problem.returncode == 1 and problem.stderr.decode("cp1252").startswith("error: no key named 'nobody'")


def test_utf8_output_keeps_the_symbols(tmp_path: Path) -> None:
    done = console(seeded(tmp_path / "home"), "list-keys", PYTHONIOENCODING="utf-8")
    text = done.stdout.decode("utf-8")
    assert "● [0] one" in text and "○ [1] two" in text and "⏱ Cooling" in text and "██████░░░░" in text


# -- a store that cannot be written ----------------------------------------------------------------------------------


@pytest.fixture
def read_only_home(tmp_path: Path) -> Iterator[Path]:
    """A store folder the kernel refuses to write, for everyone.

    The tests run as root, and root ignores permission bits (chmod 500 leaves the folder writable to it), so
    permission bits prove nothing here. A read-only bind mount of the folder makes every write fail with EROFS,
    root included, just as a read-only mount or a folder of another user does for a normal user. Where mounting is
    not allowed (not root, no CAP_SYS_ADMIN), a non-root user gets chmod, which binds it; root without mount skips.
    """
    source, view = seeded(tmp_path / "source"), tmp_path / "view"
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True, check=False)
    if mounted.returncode == 0:
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True, capture_output=True)
            assert not os.access(view, os.W_OK) or _cannot_create(view), "the bind mount is not read-only"
            yield view
        finally:
            subprocess.run(["umount", str(view)], check=False, capture_output=True)
        return
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits, and a read-only bind mount is not allowed here")
    (source / "store.db").chmod(0o400)
    source.chmod(0o500)
    try:
        yield source
    finally:
        source.chmod(0o700)
        (source / "store.db").chmod(0o600)


def _cannot_create(folder: Path) -> bool:
    try:
        (folder / "probe").touch()
    except OSError:
        return True
    (folder / "probe").unlink()
    return False


def test_reading_commands_work_on_a_read_only_store(read_only_home: Path) -> None:
    before = (read_only_home / "store.db").read_bytes()
    listing = console(read_only_home, "list-keys")
    assert listing.returncode == 0, listing.stderr
    assert b"[0] one" in listing.stdout and b"[2] three" in listing.stdout
    assert [r["name"] for r in json.loads(console(read_only_home, "list-keys", "--json").stdout)] == [
        "one", "two", "three"]
    stats = console(read_only_home, "stats")
    assert stats.returncode == 0 and b"Keys: 3" in stats.stdout, stats.stderr
    assert sorted(p.name for p in read_only_home.iterdir()) == ["store.db"]
    assert (read_only_home / "store.db").read_bytes() == before


@pytest.mark.parametrize("args", [["rotate"], ["disable", "one"], ["set-strategy", "sticky"]])
def test_writing_commands_on_a_read_only_store_fail_in_one_line(read_only_home: Path, args: list[str]) -> None:
    before = (read_only_home / "store.db").read_bytes()
    done = console(read_only_home, *args)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    store = read_only_home / "store.db"
    assert lines[0].startswith(f"error: cannot write the store {store}: it is read-only"), lines[0]
    assert (read_only_home / "store.db").read_bytes() == before


def test_a_read_only_store_that_does_not_exist_reads_as_empty(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "nowhere", readonly=True)
    try:
        assert store.keys() == [] and store.daily("0000-00-00") == {}
    finally:
        store.close()
    assert not (tmp_path / "nowhere").exists()


# -- usage errors ----------------------------------------------------------------------------------------------------

USAGE_ERRORS = {
    ("set-strategy", "random"): "error: 'random' is not a valid strategy; choose health-based, round-robin or sticky",
    ("set-cooldown", "x"): "error: MINUTES must be a whole number from 1 to 1440, not 'x'; see",
    ("set-cooldown", "0"): "error: MINUTES must be a whole number from 1 to 1440, not '0'; see",
    ("set-auto-refresh", "maybe"): "error: 'maybe' is not a valid setting; choose true or false",
    ("foo",): "error: no command 'foo'; see `kimi-rotate --help`",
    ("lst-keys",): "error: no command 'lst-keys'; did you mean `kimi-rotate list-keys`?",
    ("list-keys", "--jsn"): "error: kimi-rotate list-keys has no option --jsn; did you mean --json?",
    ("--bogus",): "error: kimi-rotate has no option --bogus; see `kimi-rotate --help`",
    ("remove-key",): "error: kimi-rotate remove-key needs INDEX|NAME; see `kimi-rotate remove-key --help`",
    ("add-key", "--surface", "mars"): "error: 'mars' is not a valid surface; choose moonshot-cn, moonshot-ai or",
    ("proxy", "--port", "abc"): "error: --port must be a whole number, not 'abc'; see `kimi-rotate proxy --help`",
    ("rotate", "now"): "error: got unexpected extra argument",
}


@pytest.mark.parametrize("args", list(USAGE_ERRORS))
def test_usage_errors_are_one_line_in_our_words(kimi_home: Path, args: tuple[str, ...]) -> None:
    result: Any = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(USAGE_ERRORS[args]), result.stderr
    for words in ("Usage:", "Try ", "Value error", "Input should", "╭"):
        assert words not in result.stderr


# -- help in a real terminal -----------------------------------------------------------------------------------------


def help_in_terminal(columns: int, commands: list[str]) -> dict[str, str]:
    """Each command's help as a terminal `columns` wide shows it: one process in a pseudo-terminal with that window
    size (and no COLUMNS variable), printing every help in turn."""
    code = (
        "import sys\nfrom kimi_rotator import cli\n"
        f"for name in {commands!r}:\n"
        "    try:\n        cli.app([*name.split(), '--help'], prog_name='kimi-rotate')\n"
        "    except SystemExit:\n        pass\n"
        "    print('=' * 3 + 'END' + '=' * 3, flush=True)\n"
    )
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        proc.wait(timeout=60)
    parts = b"".join(chunks).decode().replace("\r\n", "\n").split("===END===\n")
    return dict(zip(commands, parts, strict=False))


def _commands() -> list[str]:
    group: Any = __import__("typer").main.get_command(cli.app)
    return ["", *group.list_commands(None)]


@pytest.mark.parametrize("columns", [80, 40])
def test_help_fits_the_terminal_without_splitting_words(columns: int) -> None:
    group: Any = __import__("typer").main.get_command(cli.app)
    helps = help_in_terminal(columns, _commands())
    assert set(helps) == set(_commands())
    for name, text in helps.items():
        assert text.startswith(f"Usage: kimi-rotate {name}".rstrip()), text
        too_long = [line for line in text.splitlines() if len(line) > columns]
        assert not too_long, f"{name!r} at {columns} columns: {too_long}"
        for typer_style in ("<bool>", "<str>", "<int>", "<path>", "{", "}"):
            assert typer_style not in text, f"{typer_style} in the help of {name!r}"
        command = group.get_command(None, name) if name else group
        written = [command.help or "", *(getattr(p, "help", None) or "" for p in command.params)]
        words = set(text.split())
        split = [w for w in " ".join(written).split() if w not in words]
        assert not split, f"{name!r} at {columns} columns splits {split}"


def test_help_uses_the_readmes_metavars() -> None:
    helps = help_in_terminal(100, ["add-key", "remove-key", "set-cooldown", "clear-limits", "set-strategy",
                                   "export-keys", "import-opencode"])
    assert "Usage: kimi-rotate add-key [OPTIONS] [KEY] [NAME]" in helps["add-key"]
    assert "Usage: kimi-rotate remove-key [OPTIONS] INDEX|NAME" in helps["remove-key"]
    assert "Usage: kimi-rotate set-cooldown [OPTIONS] MINUTES" in helps["set-cooldown"]
    assert "Usage: kimi-rotate clear-limits [OPTIONS] INDEX|NAME|all" in helps["clear-limits"]
    assert "health-based|round-robin|sticky" in helps["set-strategy"]
    # The defaults are written out in the help (their modules load only when the command runs).
    assert f"Default: {backup.DEFAULT_FILE} here." in helps["export-keys"]
    path = opencode.DEFAULT_PATH
    assert f"Default: {path.name} in {path.parent}." in helps["import-opencode"]
