"""Helpers for the end-to-end tests: a real `mitmdump -s kimi_rotate.py` process, stores, and clients.

Everything runs on 127.0.0.1. Kimi host names reach the fake upstream (tests/fakekimi.py) through the production
option `kimi_resolve` plus `ssl_verify_upstream_trusted_ca`, so the proxy runs exactly the code users run; clients
CONNECT to the real names through the proxy. A guard script (GUARD_SCRIPT) loaded after the addon redirects every
connection the proxy opens to a non-loopback address to a local sink, so no test can ever reach a real host.

Every wait is bounded; a failure to start says why and shows the proxy's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from kimi_rotator.models import KeyRecord, PoolSettings, Strategy, Surface
from kimi_rotator.store import HOME_ENV, NewKey, Store, open_store
from kimi_rotator.store_sqlite import SqliteStore

if TYPE_CHECKING:  # the fake is only passed in here, never built: the hints need the class, the code does not
    from fakekimi import FakeKimi

REPO = Path(__file__).resolve().parent.parent
KIMI_SCRIPT = REPO / "kimi_rotate.py"
CLIENTS_DIR = Path(__file__).resolve().parent / "clients"
BIN = Path(sys.executable).parent
MITMDUMP = BIN / "mitmdump"
KIMI_ROTATE = BIN / "kimi-rotate"

KIMI_HOSTS = ("api.kimi.com", "api.moonshot.cn", "api.moonshot.ai")
KC_MESSAGES = "https://api.kimi.com/coding/v1/messages"
KC_CHAT = "https://api.kimi.com/coding/v1/chat/completions"
OP_CHAT = "https://api.moonshot.cn/v1/chat/completions"
OP_AI_CHAT = "https://api.moonshot.ai/v1/chat/completions"
# What a client behind the proxy sends as its credential: not a key, so the proxy must put one in.
PLACEHOLDER = "sk-placeholder-from-client"
CHAT_BODY: dict[str, Any] = {"model": "kimi-k2.6", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES_BODY: dict[str, Any] = {
    "model": "kimi-for-coding", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}],
}
# Proxy variables a developer's shell may export; a test client or proxy must never inherit them.
PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
STORE_SETTLE = 0.5  # pool.POLL_SECONDS (0.2) plus a wide margin: a running proxy has seen a store change by then


# -- keys and stores -------------------------------------------------------------------------------------------------


def kimi_key(tag: str) -> str:
    """An obviously fake Kimi Code key (sk-kimi-…) ending in `tag`, so its masked form (…tag) tells keys apart."""
    assert tag.isalnum() and len(tag) >= 4, tag
    return "sk-kimi-test" + "x" * 24 + tag


def platform_key(tag: str) -> str:
    """An obviously fake Open Platform key (sk-…, not sk-kimi-) ending in `tag`."""
    assert tag.isalnum() and len(tag) >= 4, tag
    return "sk-test" + "y" * 24 + tag


@dataclass(frozen=True)
class KeySpec:
    secret: str
    name: str
    surface: Surface = Surface.KIMI_CODE
    account: str | None = None
    cooldown_until: float | None = None  # epoch seconds: the key starts out cooling until then


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_ENV}
    env.update(extra or {})
    return env


def open_test_store(home: Path, store_url: str | None = None) -> Store:
    """The store the proxies on `home` use: its SQLite file, or with `store_url` (kimi_store) that Redis store, sealed
    with the secret file in `home` as theirs is."""
    return SqliteStore(home) if store_url is None else open_store(store_url, home)


def reset_store(
    home: Path, specs: Sequence[KeySpec], strategy: Strategy = Strategy.HEALTH_BASED, settle: bool = False,
    store_url: str | None = None,
) -> list[KeyRecord]:
    """Make the store at `home` (or the Redis store at `store_url`) hold exactly `specs` (fresh records: full
    health, no history) and `strategy`.

    Keys are removed and re-added, so a running proxy sees new ids and none of the old state. With `settle`, wait
    until any proxy on the store has had time to read the change.
    """
    store = open_test_store(home, store_url)
    try:
        store.clear_limits(None)  # caps learned from earlier tests' answers go too
        for old in list(store.keys()):
            store.remove_key(old.id)
        now = time.time()
        added = [
            store.add_key(
                NewKey(
                    secret=s.secret, name=s.name, surface=s.surface, account=s.account,
                    cooldown_until=s.cooldown_until, cooldown_reason="cooling for a test" if s.cooldown_until else None,
                ),
                now,
            )
            for s in specs
        ]
        defaults = PoolSettings()
        store.update_settings(
            strategy=strategy,
            active_key_id=None,
            serve_active_next=False,
            auto_refresh_health=defaults.auto_refresh_health,
        )
    finally:
        store.close()
    if settle:
        time.sleep(STORE_SETTLE)
    return added


def prepare_pool(
    fake: FakeKimi,
    ca: Path,
    home: Path,
    specs: Sequence[KeySpec],
    *,
    fake_specs: Iterable[KeySpec] | None = None,
    strategy: Strategy = Strategy.HEALTH_BASED,
) -> dict[str, object]:
    """Ready a pool on the fake upstream: the fake accepts `fake_specs` (default `specs`; more when a test adds keys
    later), the store at `home` holds exactly `specs` with `strategy`, and the returned options (`upstream_options`)
    send a proxy's Kimi hosts to the fake and trust its CA (`ca`)."""
    for spec in specs if fake_specs is None else fake_specs:
        fake.add_key(spec.secret, account=spec.account or "none", name=spec.name)
    reset_store(home, specs, strategy)
    return upstream_options(fake.port, ca)


def read_keys(home: Path, store_url: str | None = None) -> list[KeyRecord]:
    """The store's keys, read in-process (for polling; assertions use `cli_keys`, the public contract)."""
    store = open_test_store(home, store_url)
    try:
        return store.keys()
    finally:
        store.close()


def wait_keys(home: Path, predicate: Callable[[list[KeyRecord]], bool], timeout: float = 5.0) -> list[KeyRecord]:
    """Poll the store until `predicate` holds; the proxy writes outcomes from a background thread."""
    deadline = time.monotonic() + timeout
    while True:
        keys = read_keys(home)
        if predicate(keys):
            return keys
        if time.monotonic() >= deadline:
            summary = [(k.name, k.total_requests, k.cooldown_until, k.disabled_reason) for k in keys]
            raise AssertionError(f"store condition not met within {timeout} s: {summary}")
        time.sleep(0.05)


def run_cli(
    home: Path, *args: str, input: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run the `kimi-rotate` console script (or, where the project is not installed, its entry point from this
    checkout) on the store at `home`."""
    env = _clean_env({HOME_ENV: str(home)})
    if KIMI_ROTATE.exists():
        cmd = [str(KIMI_ROTATE), *args]
    else:
        cmd = [sys.executable, "-c", "from kimi_rotator.cli import main; main()", *args]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        cmd,
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_keys(home: Path) -> dict[str, dict[str, Any]]:
    """`kimi-rotate list-keys --json` run as a subprocess (the public contract), by key name."""
    result = run_cli(home, "list-keys", "--json")
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def key_rows(home: Path) -> dict[str, dict[str, Any]]:
    """The rows `list-keys --json` would print, built in-process by the same function (no second of start-up)."""
    from kimi_rotator import views
    from kimi_rotator.cli import key_json
    from kimi_rotator.roster import Roster

    store = SqliteStore(home)
    try:
        snap = store.snapshot()
    finally:
        store.close()
    now = time.time()
    return {s.key.name: key_json(s, now) for s in views.key_statuses(Roster(snap.keys), snap.settings, now)}


# -- the proxy process -----------------------------------------------------------------------------------------------

# Loaded after kimi_rotate.py: whatever the addon did not send to loopback goes to a local sink instead of the
# internet. With connection_strategy=lazy this runs after the addon's decisions, so it never changes what they see.
GUARD_SCRIPT = '''
import asyncio
import os
from mitmproxy import ctx

SINKS = {}
for entry in filter(None, os.environ.get("KIMI_TEST_SINKS", "").split(",")):
    port, _, target = entry.partition("=")
    host, _, tport = target.rpartition(":")
    SINKS[port] = (host, int(tport))
SEEN = os.environ.get("KIMI_TEST_GUARD_LOG")


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def sink_for(host, port):
    target = SINKS.get(str(port)) or SINKS.get("*") or ("127.0.0.1", 9)
    if SEEN:
        with open(SEEN, "a") as f:
            f.write(f"{host}:{port} -> {target[0]}:{target[1]}\\n")
    return target


class Guard:
    def server_connect(self, data):  # mitmproxy's own connections
        address = data.server.address
        if address is not None and address[0] not in LOOPBACK:
            data.server.address = sink_for(*address)


# The addon's own client (kimi_rotator/upstream.py) opens its connections with asyncio.open_connection.
_open_connection = asyncio.open_connection


async def guarded_open_connection(host=None, port=None, **kw):
    if host not in LOOPBACK:
        host, port = sink_for(host, port)
    return await _open_connection(host, port, **kw)


asyncio.open_connection = guarded_open_connection
addons = [Guard()]
'''

# mitmdump says "listening at 127.0.0.1:N", `kimi-rotate proxy` "listening on http://127.0.0.1:N".
_LISTENING = re.compile(r"listening (?:at|on) (?:http://)?\[?([0-9a-fA-F.:]+?)\]?:(\d+)")


def _option_args(options: Mapping[str, object] | Iterable[tuple[str, object]]) -> list[str]:
    pairs = options.items() if isinstance(options, Mapping) else options
    args: list[str] = []
    for name, value in pairs:
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            text = ("true" if v else "false") if isinstance(v, bool) else str(v)
            args += ["--set", f"{name}={text}"]
    return args


def end_process(proc: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout: float) -> int | None:
    """Send `sig`, then SIGKILL if the process has not exited within `timeout`; its exit status (None: none ran)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


class ProxyProcess:
    """`mitmdump -s kimi_rotate.py` on 127.0.0.1 with a random port, its own store and a temporary confdir.

    `options` are `--set` options (a list value repeats the flag); `dump` adds `-w`; `sinks` maps a port ("*" for
    any) to "host:port" for the guard script. Logs go to files, never to a pipe that could fill up.
    """

    def __init__(
        self,
        workdir: Path,
        home: Path,
        options: Mapping[str, object] | Iterable[tuple[str, object]] = (),
        *,
        confdir: Path | None = None,
        dump: Path | None = None,
        guard: bool = True,
        sinks: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.home = home
        self.confdir = confdir or workdir / "mitm"
        self.dump = dump
        self.options = list(options.items() if isinstance(options, Mapping) else options)
        self.guard = guard
        self.sinks = dict(sinks or {})
        self.extra_env = dict(env or {})
        self.stdout_path = workdir / "mitmdump.stdout"
        self.stderr_path = workdir / "mitmdump.stderr"
        self.guard_log = workdir / "guard.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def command(self) -> list[str]:
        cmd = [str(MITMDUMP), "-s", str(KIMI_SCRIPT)]
        if self.guard:
            guard = self.workdir / "guard_addon.py"
            guard.write_text(GUARD_SCRIPT)
            cmd += ["-s", str(guard)]
        cmd += ["--listen-host", "127.0.0.1", "--listen-port", "0", "--set", f"confdir={self.confdir}"]
        cmd += _option_args(self.options)
        if self.dump is not None:
            cmd += ["-w", str(self.dump)]
        return cmd

    def start(self) -> ProxyProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.confdir.mkdir(parents=True, exist_ok=True)
        env = _clean_env({HOME_ENV: str(self.home), "PYTHONUNBUFFERED": "1", **self.extra_env})
        env["KIMI_TEST_SINKS"] = ",".join(f"{k}={v}" for k, v in self.sinks.items())
        env["KIMI_TEST_GUARD_LOG"] = str(self.guard_log)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=self.workdir
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = _LISTENING.search(self.log_text())
            if found:
                self.port = int(found.group(2))
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"mitmdump did not listen within {START_TIMEOUT} s:\n{self.log_text()}")
        _wait_port(self.port)
        return self

    def log_bytes(self) -> bytes:
        out = b""
        for p in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(FileNotFoundError):
                out += p.read_bytes()
        return out

    def log_text(self) -> str:
        return self.log_bytes().decode("utf-8", "replace")

    def guard_hits(self) -> list[str]:
        try:
            return self.guard_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        return end_process(proc, signal.SIGTERM, STOP_TIMEOUT)

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def upstream_options(fake_port: int, ca: Path, extra_resolve: Iterable[str] = ()) -> dict[str, object]:
    """The production options that send the three Kimi hosts to the fake upstream and trust its test CA."""
    return {
        "kimi_resolve": [f"{h}=127.0.0.1:{fake_port}" for h in KIMI_HOSTS] + list(extra_resolve),
        "ssl_verify_upstream_trusted_ca": str(ca),
    }


def ensure_mitm_ca(confdir: Path) -> Path:
    """Create mitmproxy's CA in `confdir` once, so proxies sharing it never race to create it."""
    from mitmproxy.certs import CertStore

    confdir.mkdir(parents=True, exist_ok=True)
    CertStore.from_store(str(confdir), "mitmproxy", 2048)
    return confdir / "mitmproxy-ca-cert.pem"


# -- clients ---------------------------------------------------------------------------------------------------------


@dataclass
class CurlResult:
    status: int
    headers: dict[str, str]  # lower-cased names, last value wins
    body: bytes
    http_version: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.body)


def curl(
    proxy: ProxyProcess | str,
    url: str,
    *,
    ca: Path | None = None,
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    body: Any = None,
    method: str | None = None,
    http1: bool = False,
    extra: Sequence[str] = (),
    timeout: float = 30.0,
) -> CurlResult:
    """One request with curl through the proxy (`--proxy`, `--cacert`); JSON bodies are sent as JSON."""
    proxy_url = proxy.url if isinstance(proxy, ProxyProcess) else proxy
    if ca is None and isinstance(proxy, ProxyProcess):
        ca = proxy.ca
    cmd = ["curl", "-sS", "-N", "--max-time", str(timeout), "--proxy", proxy_url, "-D", "-", "-o", "-"]
    if ca is not None:
        cmd += ["--cacert", str(ca)]
    if http1:
        cmd.append("--http1.1")
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for k, v in pairs:
        cmd += ["-H", f"{k}: {v}"]
    if body is not None:
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        cmd += ["--data-binary", "@-"]
        if not any(k.lower() == "content-type" for k, _ in pairs):
            cmd += ["-H", "content-type: application/json"]
    if method:
        cmd += ["-X", method]
    cmd += [*extra, url]
    stdin = data.encode() if body is not None and isinstance(data, str) else (data if body is not None else None)
    r = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout + 10, env=_clean_env(), check=False)
    if r.returncode != 0:
        return CurlResult(0, {}, r.stdout, "", r.stderr.decode("utf-8", "replace"))
    return _parse_curl(r.stdout, r.stderr.decode("utf-8", "replace"))


def _parse_curl(raw: bytes, stderr: str) -> CurlResult:
    # -D - writes every header block (a CONNECT's "200 Connection established" first), then the body.
    rest = raw
    status, version, headers = 0, "", {}
    while rest.startswith(b"HTTP/"):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, code = lines[0].split(" ")[0], lines[0].split(" ")[1]
        status = int(code)
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if not sep:
            break
    return CurlResult(status, headers, rest, version, stderr)


def proxy_client(proxy: ProxyProcess, *, http2: bool = False, timeout: float = 30.0, **kw: Any) -> httpx.Client:
    """An httpx client that goes through the proxy and trusts only mitmproxy's CA; never reads proxy env vars."""
    verify = ssl.create_default_context(cafile=str(proxy.ca))
    return httpx.Client(proxy=proxy.url, verify=verify, trust_env=False, http2=http2, timeout=timeout, **kw)


@dataclass
class Line:
    t: float  # seconds since the request was sent
    text: str


@dataclass
class StreamResult:
    status: int
    headers: httpx.Headers
    t_headers: float
    lines: list[Line] = field(default_factory=list)
    body: bytes = b""

    @property
    def data_lines(self) -> list[Line]:
        return [ln for ln in self.lines if ln.text.startswith("data:")]

    def json(self) -> Any:
        return json.loads(self.body)


def stream_request(
    client: httpx.Client,
    url: str,
    *,
    body: Any,
    headers: Mapping[str, str] | None = None,
    method: str = "POST",
) -> StreamResult:
    """Send a request and read the answer line by line, recording when each line arrived."""
    t0 = time.monotonic()
    with client.stream(method, url, json=body, headers=dict(headers or {})) as r:
        result = StreamResult(r.status_code, r.headers, time.monotonic() - t0)
        raw = bytearray()
        buf = b""
        for chunk in r.iter_raw():
            now = time.monotonic() - t0
            raw += chunk
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode("utf-8", "replace").rstrip("\r")
                if text:
                    result.lines.append(Line(now, text))
        if buf.strip():
            result.lines.append(Line(time.monotonic() - t0, buf.decode("utf-8", "replace")))
        result.body = bytes(raw)
    return result


def sse_texts(result: StreamResult) -> list[str]:
    """The content text of each data event (OpenAI delta.content or Anthropic text_delta), skipping empty ones."""
    out: list[str] = []
    for ln in result.data_lines:
        data = ln.text[5:].strip()
        if data == "[DONE]":
            continue
        obj = json.loads(data)
        if obj.get("type") == "content_block_delta":
            out.append(obj["delta"].get("text", ""))
        else:
            out += [c.get("delta", {}).get("content") or "" for c in obj.get("choices", [])]
    return [t for t in out if t]


def content_times(result: StreamResult) -> list[float]:
    """Arrival times of the data events that carry generated text."""
    times = []
    for ln in result.data_lines:
        data = ln.text[5:].strip()
        if data == "[DONE]":
            continue
        obj = json.loads(data)
        text = obj["delta"].get("text") if obj.get("type") == "content_block_delta" else "".join(
            c.get("delta", {}).get("content") or "" for c in obj.get("choices", [])
        )
        if text:
            times.append(ln.t)
    return times


# -- small local servers ---------------------------------------------------------------------------------------------


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace"),
        }
        self.server.seen.append(seen)  # type: ignore[attr-defined]
        data = json.dumps({"echo": True, "plain": True, **seen}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _echo


class PlainEcho:
    """A plain-HTTP echo server on 127.0.0.1 (stands for any non-TLS upstream); records what it saw."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
        self.server.daemon_threads = True
        self.server.seen = []  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def seen(self) -> list[dict[str, Any]]:
        return list(self.server.seen)  # type: ignore[attr-defined]

    def __enter__(self) -> PlainEcho:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    issuer: str  # issuer of the certificate the client was shown: mitmproxy's CA means the tunnel was decrypted

    def json(self) -> Any:
        return json.loads(self.body)


def tunnel_request(
    proxy: ProxyProcess,
    connect: str,
    *,
    port: int = 443,
    sni: str | None = None,
    host_header: str | None = None,
    path: str = "/v1/chat/completions",
    headers: Mapping[str, str] | None = None,
    body: Any = None,
    ca: Path | None = None,
    check_hostname: bool = True,
    tls: bool = True,
    timeout: float = 15.0,
) -> RawResponse:
    """One HTTP/1.1 request through a CONNECT tunnel, with every part chosen separately: the CONNECT authority
    (`connect`:`port`), the TLS server name (`sni`, default `connect`) and the Host header (default `connect`).

    `ca` is what the client trusts (default: the proxy's mitmproxy CA); `tls=False` speaks plain HTTP in the tunnel.
    """
    sni = sni or connect
    host_header = host_header or connect
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    lines = [f"POST {path} HTTP/1.1", f"Host: {host_header}", "Connection: close", f"Content-Length: {len(data)}"]
    lines += ["Content-Type: application/json"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + data

    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout)
    sock.settimeout(timeout)
    try:
        sock.sendall(f"CONNECT {connect}:{port} HTTP/1.1\r\nHost: {connect}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"the proxy closed the CONNECT: {head!r}")
            head += chunk
        if head.split(b" ")[1] != b"200":
            raise ConnectionError(f"CONNECT refused: {head!r}")
        issuer = ""
        conn: socket.socket = sock
        if tls:
            ctx = ssl.create_default_context(cafile=str(ca or proxy.ca))
            ctx.check_hostname = check_hostname
            ctx.set_alpn_protocols(["http/1.1"])
            conn = ctx.wrap_socket(sock, server_hostname=sni)
            from cryptography import x509

            cert = x509.load_der_x509_certificate(conn.getpeercert(binary_form=True) or b"")
            issuer = ", ".join(str(a.value) for a in cert.issuer)
        conn.sendall(request)
        raw = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except (ssl.SSLError, ConnectionResetError):
                break  # a peer that closes without close_notify; what arrived is the answer
            if not chunk:
                break
            raw += chunk
    finally:
        sock.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    resp_headers = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        resp_headers[k.strip().lower()] = v.strip()
    if "chunked" in resp_headers.get("transfer-encoding", ""):
        rest = _dechunk(rest)
    return RawResponse(int(status_line.split(" ")[1]), resp_headers, rest, issuer)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


@contextlib.contextmanager
def timer() -> Iterator[Callable[[], float]]:
    t0 = time.monotonic()
    yield lambda: time.monotonic() - t0
