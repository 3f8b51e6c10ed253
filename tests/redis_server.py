"""A real `redis-server` for the tests: on a free loopback port, with no persistence, stopped and started at will.

The Redis store's tests run against the real server (issue 11: a fake Redis library is not enough). No persistence
(`--save ''`, `--appendonly no`, a private `--dir`): a stop and start on the same port loses every key, which is what
the outage tests want (a Redis restarted without persistence).

Fixtures (tests/conftest.py loads this module as a plugin, so every test module has them without an import):
- `redis_server`: one server for the session, with an ACL user (the default user is off), as a team's Redis has;
- `redis_url`: its `redis://user:pass@127.0.0.1:N/0`, after a FLUSHALL, for a test that starts from an empty Redis;
- `private_redis_server`: a server of the test's own, for the tests that stop, kill or restart it.
Without redis-server they skip, except under CI (the CI variable set), where they fail: CI must not skip them.

Every wait is bounded; a server that does not start says why and shows its log.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pytest
from harness import end_process

if TYPE_CHECKING:  # redis-py is imported when a server is used, so a module importing the fixtures stays light
    import redis

REDIS_SERVER_ENV = "KIMI_TEST_REDIS_SERVER"  # another redis-server binary (e.g. an official build)
DEFAULT_REDIS_SERVER = "/usr/bin/redis-server"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
MONITOR_TIMEOUT = 5.0
_PORT_ATTEMPTS = 5  # a free port can be taken by another process between our probe and the server's bind


def redis_server_binary() -> str | None:
    """$KIMI_TEST_REDIS_SERVER, else redis-server on PATH, else /usr/bin/redis-server; None when none exists."""
    env = os.environ.get(REDIS_SERVER_ENV)
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("redis-server")
    if found:
        return found
    return DEFAULT_REDIS_SERVER if os.access(DEFAULT_REDIS_SERVER, os.X_OK) else None


def require_redis_server() -> str:
    """The redis-server binary; skips the test when there is none, or fails it under CI, which must run them all."""
    binary = redis_server_binary()
    if binary is None:
        reason = "no redis-server (install Debian's redis-server package, or set KIMI_TEST_REDIS_SERVER)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI runs the Redis tests, it does not skip them", pytrace=False)
        pytest.skip(reason)
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """`redis-server` on 127.0.0.1: `start()` picks a free port the first time and keeps it for every later start.

    With `username` (and `password`, random when not given) the server has that ACL user with every right, and the
    default user is off, so only `url` (which carries the credentials) gets in. Its log goes to `workdir/redis.log`.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        binary: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        """`extra`: more redis-server options (a TLS port, say)."""
        if password is not None and username is None:
            raise ValueError("a password needs a username (the default user is the one switched off)")
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="redis-")) if workdir is None else workdir
        self.username = username
        self.password = (password or secrets.token_hex(12)) if username is not None else None
        self.binary = binary or require_redis_server()
        self.extra = list(extra)
        self.port = 0
        self.log_path = self.workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("the Redis server has no port yet; start() it first")
        auth = f"{self.username}:{self.password}@" if self.username is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, port: int) -> list[str]:
        cmd = [
            self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "yes", "--dir", str(self.workdir),
        ]
        if self.username is not None:
            cmd += ["--user", self.username, "on", f">{self.password}", "~*", "&*", "+@all", "--user", "default", "off"]
        return cmd + self.extra

    def start(self) -> RedisServer:
        """Starts the server and waits until it answers PING; the same port as before when it ran already."""
        if self.running:
            raise RuntimeError(f"the Redis server on port {self.port} is running already")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.port:
            try:
                self._start_on(self.port)
            except _PortTaken:
                raise RuntimeError(f"port {self.port} was taken while Redis was down; it cannot start on it again:\n"
                                   f"{self.log_text()}") from None
            return self
        for _ in range(_PORT_ATTEMPTS):
            port = free_port()
            try:
                self._start_on(port)
            except _PortTaken:
                continue
            self.port = port
            return self
        raise RuntimeError(f"redis-server found no free port in {_PORT_ATTEMPTS} tries:\n{self.log_text()}")

    def _start_on(self, port: int) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting on port {port}\n".encode())
            log.flush()
            this_start = log.tell()  # where this start's lines begin, to tell a taken port from another failure
            self.proc = subprocess.Popen(
                self.command(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + START_TIMEOUT
        last_error = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                if b"Address already in use" in self.log_path.read_bytes()[this_start:]:
                    raise _PortTaken
                raise RuntimeError(f"redis-server exited with {code} before answering PING:\n{self.log_text()}")
            try:
                with self._client_on(port, socket_timeout=1.0) as client:
                    client.ping()
                    # Another process may have taken the port between free_port() and our bind: only ours counts.
                    if client.info("server")["process_id"] == self.proc.pid:
                        return
                    last_error = "another process answers on the port"
            except Exception as e:  # not listening yet, or still loading: any failure means "try again"
                last_error = f"{type(e).__name__}: {e}"
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT} s ({last_error}):\n"
                           f"{self.log_text()}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT; the exit status (None if not running)."""
        return self._end(signal.SIGTERM)

    def kill(self) -> int | None:
        """SIGKILL at once: Redis vanishes as a crashed or unplugged server does."""
        return self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> int | None:
        proc, self.proc = self.proc, None
        return end_process(proc, sig, STOP_TIMEOUT)

    def close(self) -> None:
        """Stops the server and removes the folder it made itself (a folder passed in is left for the test's logs)."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return "(no log)"

    def client(self, **kw: Any) -> redis.Redis:
        """A sync redis-py client on the server (credentials included) that does not retry: a test sees a refused
        connection at once, not after redis-py's default retries with backoff (~3 s). `kw` goes to redis.Redis."""
        return self._client_on(self.port, **kw)

    def _client_on(self, port: int, **kw: Any) -> redis.Redis:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        options: dict[str, Any] = {
            "host": "127.0.0.1", "port": port, "username": self.username, "password": self.password,
            "socket_timeout": 5.0, "socket_connect_timeout": 2.0, "retry": Retry(NoBackoff(), 0), **kw,
        }
        return redis.Redis(**options)

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def monitor(self) -> Monitor:
        """`with server.monitor() as seen:` collects every line of MONITOR while the block runs; see Monitor."""
        return Monitor(self)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PortTaken(Exception):
    pass


class Monitor:
    """MONITOR on its own connection, read by a thread: `lines` holds every line the server sent, raw as Redis
    writes them (`1700000000.123456 [0 127.0.0.1:40000] "SET" "k" "v"`, with Lua's own calls as `[0 lua]`).

    On entry MONITOR is on (its OK has come back) before the block runs; on exit a marker command is sent and the
    lines are kept up to it, so every command that completed inside the block is in `lines` (Redis runs commands in
    order). If the server stopped meanwhile, `lines` holds what was seen until then.
    """

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.lines: list[str] = []
        self._marker = f"kimi-test-monitor-end-{secrets.token_hex(6)}"
        self._marker_seen = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def text(self) -> str:
        return "\n".join(self.lines)

    def __enter__(self) -> Monitor:
        sock = socket.create_connection(("127.0.0.1", self.server.port), START_TIMEOUT)
        reader = sock.makefile("rb")
        try:
            if self.server.username is not None:
                assert self.server.password is not None
                sock.sendall(_resp("AUTH", self.server.username, self.server.password))
                _expect_ok(reader.readline(), "AUTH")
            sock.sendall(_resp("MONITOR"))
            _expect_ok(reader.readline(), "MONITOR")
        except BaseException:
            reader.close()
            sock.close()
            raise
        sock.settimeout(None)  # the reader blocks until a line comes or the socket is shut down
        self._sock = sock
        self._thread = threading.Thread(target=self._read, args=(reader,), name="redis-monitor", daemon=True)
        self._thread.start()
        return self

    def _read(self, reader: io.BufferedReader) -> None:
        with contextlib.suppress(OSError, ValueError), reader:
            for raw in reader:
                line = raw.decode("utf-8", "replace").rstrip("\r\n").removeprefix("+")
                if self._marker in line:
                    self._marker_seen.set()
                    return
                self.lines.append(line)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        connection_lost = False
        try:
            if self.server.running and self._thread is not None:
                with contextlib.suppress(Exception), self.server.client(socket_timeout=2.0) as client:
                    client.echo(self._marker)
                    deadline = time.monotonic() + MONITOR_TIMEOUT
                    while self._thread.is_alive() and not self._marker_seen.wait(0.05):
                        if time.monotonic() >= deadline:
                            break
            connection_lost = self._thread is None or not self._thread.is_alive()
        finally:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
                self._sock.close()
            if self._thread is not None:
                self._thread.join(MONITOR_TIMEOUT)
        # A server stopped (or restarted) inside the block ended MONITOR's connection: `lines` is what it saw.
        if exc_type is None and not connection_lost and not self._marker_seen.is_set():
            raise RuntimeError(f"MONITOR did not see its end marker within {MONITOR_TIMEOUT} s; its lines may be "
                               "incomplete")


def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _expect_ok(line: bytes, what: str) -> None:
    if not line.startswith(b"+OK"):
        raise RuntimeError(f"Redis refused {what}: {line.decode('utf-8', 'replace').strip()}")


# -- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the session, ACL user `kimi` with a random password, default user off. Tests must not stop it
    (use `private_redis_server`); use `redis_url` for an empty one."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"), username="kimi")
    with server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis's URL (`redis://kimi:<password>@127.0.0.1:<port>/0`), emptied by FLUSHALL for this test."""
    if not redis_server.running:  # a test stopped it by mistake: give the next ones a server again
        redis_server.start()
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def private_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own (same ACL set-up as `redis_server`), to stop, kill and start again; stopped after."""
    require_redis_server()
    server = RedisServer(tmp_path / "redis", username="kimi")
    with server:
        yield server
