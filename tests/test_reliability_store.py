"""Issue 5 item 4: a broken store. Truncated, garbage, a newer schema version, a read-only folder, a full disk.

For each, a real `mitmdump -s kimi_rotate.py` must: say clearly what is wrong in its log; answer requests to Kimi hosts
with a 503 whose JSON body (in the envelope of the route) says what is wrong; keep other traffic flowing (plain HTTP to
an echo server, and a TLS tunnel to another host that stays undecrypted); and never overwrite the file.

Read-only folder and full disk need real file systems: the proxy runs in a private mount namespace
(`unshare -m`) where its store folder is a read-only bind mount or a small tmpfs, so nothing changes for the rest of
the machine and the mount vanishes with the process. Where that is not possible the test says why and skips; the
full disk is also covered by an injected `sqlite3.OperationalError("database or disk is full")` raised from the
store's own SQL statements, which needs no privilege. Once space is back the proxy serves again without a restart,
and the outcomes it could not write meanwhile are written then.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakekimi import FakeKimi
from harness import (
    CHAT_BODY,
    KC_CHAT,
    KC_MESSAGES,
    MESSAGES_BODY,
    KeySpec,
    PlainEcho,
    ProxyProcess,
    kimi_key,
    reset_store,
    tunnel_request,
    upstream_options,
)
from test_reliability_support import WrappedProxy

pytestmark = [pytest.mark.e2e]

KEYS = [KeySpec(kimi_key("b001"), "one", account="acct-1"), KeySpec(kimi_key("b002"), "two", account="acct-2")]
HEADERS = {"authorization": "Bearer sk-placeholder"}


# -- helpers -----------------------------------------------------------------------------------------------------------


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_store(home: Path) -> Path:
    reset_store(home, KEYS)
    return home / "store.db"


def kimi_answers(proxy: ProxyProcess) -> list[httpx.Response]:
    """One OpenAI-style and one Anthropic-style request to Kimi Code through the proxy."""
    verify = ssl.create_default_context(cafile=str(proxy.ca))
    with httpx.Client(proxy=proxy.url, verify=verify, trust_env=False, timeout=20) as client:
        return [client.post(KC_CHAT, json=CHAT_BODY, headers=HEADERS),
                client.post(KC_MESSAGES, json=MESSAGES_BODY, headers={"x-api-key": "sk-placeholder"})]


def assert_503_says(answers: list[httpx.Response], *words: str) -> None:
    openai, anthropic = answers
    assert openai.status_code == anthropic.status_code == 503, (openai.text, anthropic.text)
    assert openai.json()["error"]["type"] == "server_unavailable"
    assert anthropic.json()["type"] == "error" and anthropic.json()["error"]["type"] == "overloaded_error"
    for r in answers:
        message = r.json()["error"]["message"]
        assert "key store" in message and any(w in message for w in words), message


def assert_other_traffic_flows(proxy: ProxyProcess, plain: PlainEcho, pki: Any) -> None:
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as client:
        r = client.get(f"http://127.0.0.1:{plain.port}/other?x=1")
    assert r.status_code == 200 and r.json()["path"] == "/other?x=1"
    tls = tunnel_request(proxy, "echo.test", ca=pki.ca_cert, path="/tunnel", body={"x": 1})
    assert tls.status == 200 and tls.json()["echo"] is True
    assert "kimi-rotate test CA" in tls.issuer  # the tunnel was not decrypted: the client saw the echo's own cert


def mount_namespace_problem(tmp: Path) -> str | None:
    """None if this process may mount a tmpfs in a private mount namespace; else why not."""
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not installed"
    probe = tmp / "mount-probe"
    probe.mkdir(exist_ok=True)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs -o size=64k tmpfs "$0" && touch "$0/x"', str(probe)],
                       capture_output=True, text=True, timeout=20, check=False)
    if r.returncode != 0:
        return f"cannot mount in a private mount namespace here (needs CAP_SYS_ADMIN): {r.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def plain() -> Iterator[PlainEcho]:
    with PlainEcho() as echo:
        yield echo


@pytest.fixture
def start(
    tmp_path: Path, pki: Any, mitm_confdir: Path, fake_kimi: FakeKimi, echo_server: FakeKimi
) -> Iterator[Callable[..., ProxyProcess]]:
    """start(home, **WrappedProxy kw) -> a running proxy routed to the fake, with a sink for other hosts' 443."""
    for spec in KEYS:
        fake_kimi.add_key(spec.secret, account=spec.account or "none", name=spec.name)
    started: list[ProxyProcess] = []

    def run(home: Path, **kw: Any) -> ProxyProcess:
        proxy = WrappedProxy(tmp_path / f"proxy{len(started)}", home, upstream_options(fake_kimi.port, pki.ca_cert),
                             confdir=mitm_confdir, sinks={"443": f"127.0.0.1:{echo_server.port}"}, **kw)
        started.append(proxy)
        return proxy.start()

    yield run
    for p in started:
        p.stop()


# -- damaged files -----------------------------------------------------------------------------------------------------


def truncate(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


def garbage(db: Path) -> None:
    db.write_bytes(os.urandom(4096) + b"not a database\n" * 100)


def newer_schema(db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()


@pytest.mark.parametrize(("damage", "words"), [
    pytest.param(truncate, ("damaged",), id="truncated"),
    pytest.param(garbage, ("not an SQLite database", "damaged"), id="garbage"),
    pytest.param(newer_schema, ("newer kimi-rotate",), id="newer-schema"),
])
def test_damaged_store(
    tmp_path: Path, start: Callable[..., ProxyProcess], plain: PlainEcho, pki: Any, fake_kimi: FakeKimi,
    damage: Callable[[Path], None], words: tuple[str, ...],
) -> None:
    home = tmp_path / "home"
    db = make_store(home)
    damage(db)
    before = digest(db)
    proxy = start(home)
    assert "kimi-rotate: the store" in proxy.log_text() or "newer kimi-rotate" in proxy.log_text()
    assert_503_says(kimi_answers(proxy), *words)
    assert fake_kimi.requests == []  # no key could be chosen, so nothing went upstream
    assert_other_traffic_flows(proxy, plain, pki)
    proxy.stop()
    assert digest(db) == before  # never overwritten, not even on shutdown


# -- read-only folder --------------------------------------------------------------------------------------------------


def test_read_only_folder(tmp_path: Path, start: Callable[..., ProxyProcess], plain: PlainEcho, pki: Any) -> None:
    home = tmp_path / "home"
    db = make_store(home)
    before = digest(db)
    problem = mount_namespace_problem(tmp_path)
    if problem is None:
        # The store folder is a read-only bind mount of itself, seen only by the proxy.
        prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                  'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', str(home)]
    elif os.geteuid() != 0:
        home.chmod(0o500)  # without root, permissions are enough
        prefix = []
    else:
        pytest.skip(f"read-only folder: running as root, where chmod does not stop writes, and {problem}")
    try:
        proxy = start(home, prefix=prefix)
        assert "cannot write the store" in proxy.log_text(), proxy.log_text()[-2000:]
        assert_503_says(kimi_answers(proxy), "writable", "read-only", "readonly")
        assert_other_traffic_flows(proxy, plain, pki)
        proxy.stop()
    finally:
        home.chmod(0o700)
    assert digest(db) == before


# -- full disk ---------------------------------------------------------------------------------------------------------


def wait_for_503(proxy: ProxyProcess, tries: int = 30) -> list[httpx.Response]:
    """Send requests until the proxy has noticed that its writes fail (each success queues one more write)."""
    answers: list[httpx.Response] = []
    for _ in range(tries):
        answers = kimi_answers(proxy)
        if any(r.status_code == 503 for r in answers):
            if answers[0].status_code != 503:  # the failure landed between the two: ask once more
                answers = kimi_answers(proxy)
            return answers
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        time.sleep(0.3)
    return answers


def wait_for_service(proxy: ProxyProcess, timeout: float = 5.0) -> None:
    """Once the store can be written again, the proxy serves again by itself (no restart)."""
    deadline = time.monotonic() + timeout
    while True:
        answers = kimi_answers(proxy)
        if all(r.status_code == 200 for r in answers):
            return
        assert time.monotonic() < deadline, [r.text for r in answers]
        time.sleep(0.2)


def fill(folder: Path) -> None:
    """Write zeros into `folder` until its file system is full (bounded by the tmpfs size)."""
    with open(folder / "filler", "wb") as f:
        try:
            for _ in range(4096):
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            return
    raise AssertionError("the file system never filled up")


def test_disk_full_tmpfs(tmp_path: Path, start: Callable[..., ProxyProcess], plain: PlainEcho, pki: Any) -> None:
    problem = mount_namespace_problem(tmp_path)
    if problem is not None:
        pytest.skip(f"real full disk: {problem}; the injected variant below covers the same path")
    src = tmp_path / "src"
    make_store(src)
    home = tmp_path / "home"
    home.mkdir()
    # A 1 MiB tmpfs holding a copy of the store, visible only to the proxy.
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c",
              'mount -t tmpfs -o size=1m,mode=700 tmpfs "$0" && cp -a "$1"/. "$0"/ && shift && exec "$@"',
              str(home), str(src)]
    proxy = start(home, prefix=prefix)
    assert proxy.proc is not None
    inside = Path(f"/proc/{proxy.proc.pid}/root") / str(home).lstrip("/")
    assert [r.status_code for r in kimi_answers(proxy)] == [200, 200]
    time.sleep(0.5)  # those outcomes are written while there is room
    fill(inside)
    assert_503_says(wait_for_503(proxy), "disk is full", "full")
    assert "disk is full" in proxy.log_text()
    assert_other_traffic_flows(proxy, plain, pki)

    # What is on the full disk is still a healthy store with every key.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("store.db", "store.db-wal"):
        if (inside / name).exists():
            shutil.copyfile(inside / name, copy / name)
    con = sqlite3.connect(copy / "store.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert {r[0] for r in con.execute("SELECT name FROM keys")} == {s.name for s in KEYS}
    finally:
        con.close()
    # Space comes back: the proxy serves again without a restart.
    (inside / "filler").unlink()
    wait_for_service(proxy)


INJECT = '''
"""Test-only: from the moment the trigger file exists, every write statement of the kimi-rotate store fails like
SQLite does on a full disk."""
import os
import sqlite3
import sys

from mitmproxy import ctx

TRIGGER = os.environ["KIMI_TEST_DISK_FULL"]
WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class FullDisk:
    def __init__(self, db):
        self._db = db

    def _check(self, sql):
        if os.path.exists(TRIGGER) and sql.lstrip().split(None, 1)[0].upper() in WRITES:
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql, *args):
        self._check(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql, *args):
        self._check(sql)
        return self._db.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


class Inject:
    def running(self):
        addon = ctx.master.addons.get("kimirotate")
        if addon is None:
            module = next(m for n, m in sys.modules.items() if n.startswith("__mitmproxy_script__.kimi_rotate"))
            addon = module.addons[0]
        addon.store._db = FullDisk(addon.store._db)


addons = [Inject()]
'''


def test_disk_full_injected(
    tmp_path: Path, start: Callable[..., ProxyProcess], plain: PlainEcho, pki: Any, fake_kimi: FakeKimi
) -> None:
    home = tmp_path / "home"
    make_store(home)
    script = tmp_path / "inject_disk_full.py"
    script.write_text(INJECT)
    trigger = tmp_path / "disk-is-full"
    proxy = start(home, scripts=[script], env={"KIMI_TEST_DISK_FULL": str(trigger)})
    assert [r.status_code for r in kimi_answers(proxy)] == [200, 200]
    time.sleep(0.5)
    trigger.touch()
    assert_503_says(wait_for_503(proxy), "disk is full")
    assert "disk is full" in proxy.log_text()
    assert_other_traffic_flows(proxy, plain, pki)
    trigger.unlink()
    wait_for_service(proxy)
    proxy.stop()
    con = sqlite3.connect(home / "store.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {r[0]: r[1] for r in con.execute("SELECT name, total_requests FROM keys")}
    finally:
        con.close()
    assert set(rows) == {s.name for s in KEYS}
    # Outcomes that could not be written while the disk was full were kept and written once it was not.
    assert sum(rows.values()) == sum(1 for r in fake_kimi.requests if r.key_name is not None)
