"""Loopback benchmark: stock mitmdump vs `mitmdump -s kimi_rotate.py` vs the slim `kimi-rotate proxy`.

One run starts its own TLS upstream and load generator (each in its own process) and, per round, a fresh
proxy of every kind side by side; the load generator alternates short slices between them so background
load hits all alike. Prints medians over rounds and ratios against stock paired within each round.
Nothing leaves 127.0.0.1. See benchmarks/README.md.

    python benchmarks/bench_proxy.py [--quick] [--json results.json] [--baseline DIR] [--metrics]

With --baseline, a checkout of older code (`git worktree add /tmp/base <commit>`) runs as two more proxies in the
same rounds, `-s DIR/kimi_rotate.py` and `kimi-rotate proxy` with DIR first on PYTHONPATH, and the report adds
their ratios new/old. With --metrics, one more proxy runs `kimi-rotate proxy --metrics 127.0.0.1:PORT` (kimi_metrics)
in the same rounds, and the report adds its ratios against the slim proxy without metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import re
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST, PATH = "api.kimi.com", "/coding/v1/chat/completions"
STREAM_FLAG = re.compile(rb'"stream"\s*:\s*true')
REPLY = '{{"id":"bench","t_up":{t:.6f},"choices":[{{"index":0,"message":{{"content":"hi"}}}}]}}'
T_UP = re.compile(rb'"t_up":([0-9.]+)')  # when the upstream read the request (perf_counter is system-wide on Linux)
RATE_LIMITED = json.dumps({"error": {"type": "rate_limit_reached_error", "message": (
    "Your account org-bench request reached organization max RPM: 3, please try again after 60 seconds")}}).encode()
REQUEST_TIMEOUT, PHASE_LIMIT = 15.0, 60.0  # seconds for one request / for one slice of a phase
CONFIGS = ("stock", "addon", "slim")
BASELINE_CONFIGS = ("addon_old", "slim_old")  # with --baseline: the same two proxies, running the baseline's code
METRICS_CONFIG = "slim_metrics"  # with --metrics: the slim proxy serving Prometheus metrics
LABELS = {"direct": "direct (no proxy)", "stock": "a stock mitmdump", "addon": "b mitmdump -s kimi_rotate",
          "slim": "c kimi-rotate proxy", "addon_old": "b' baseline -s kimi_rotate", "slim_old": "c' baseline proxy",
          METRICS_CONFIG: "c+ proxy --metrics"}
PHASES = (("json_c1", False, 1), ("json_c10", False, 10), ("sse_c1", True, 1), ("sse_c10", True, 10))
SLICES = 4  # each phase alternates between the targets in this many slices
STOCK_SCRIPT = '''UPSTREAM = ("127.0.0.1", {port})
def server_connect(data):  # route api.kimi.com:443 to the bench upstream, as kimi_resolve does
    if data.server.address == ("{host}", 443):
        data.server.address = UPSTREAM
def responseheaders(flow):  # stream SSE as the addon does; stock would buffer the whole stream
    if "text/event-stream" in flow.response.headers.get("content-type", ""):
        flow.response.stream = True
'''

# ---------------------------------------------------------------------------------------------- upstream


@dataclass
class Upstream:
    events: int
    interval: float
    fail: dict[str, int] = field(default_factory=dict)  # Bearer value -> 429s still to answer
    last_ok: str = ""  # the key used last: the one a health-sticky proxy will use next
    served: dict[str, int] = field(default_factory=lambda: {"json": 0, "sse": 0, "429": 0})

    async def connection(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                path, headers = parse_head(await r.readuntil(b"\r\n\r\n"))
                body = await r.readexactly(int(headers.get("content-length", "0")))
                t_up = time.perf_counter()
                key = headers.get("authorization", "").removeprefix("Bearer ")
                if path.startswith("/_bench/"):
                    w.write(response(200, json.dumps(self.control(path, body)).encode()))
                elif self.fail.get(key, 0) > 0:
                    self.fail[key] -= 1
                    self.served["429"] += 1
                    w.write(response(429, RATE_LIMITED))
                elif STREAM_FLAG.search(body):
                    self.last_ok = key
                    await self.sse(w, t_up)
                else:
                    self.last_ok = key
                    self.served["json"] += 1
                    w.write(response(200, REPLY.format(t=t_up).encode()))
                await w.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    async def sse(self, w: asyncio.StreamWriter, t_up: float) -> None:
        """`events` chunked SSE events: the first at once, then one every `interval`."""
        self.served["sse"] += 1
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(self.events):
            if i:
                await asyncio.sleep(self.interval)
            event = b'data: {"t_up":%.6f,"choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % (t_up, i)
            if i == self.events - 1:
                event += b"data: [DONE]\n\n"
            w.write(b"%x\r\n%s\r\n" % (len(event), event))
            await w.drain()
        w.write(b"0\r\n\r\n")

    def control(self, path: str, body: bytes) -> dict[str, int]:
        """/_bench/fail {"key": Bearer value, or null for the key used last, "times": n}; /_bench/stats."""
        if path == "/_bench/fail":
            spec = json.loads(body or b"{}")
            key = spec.get("key") or self.last_ok
            self.fail[key] = self.fail.get(key, 0) + int(spec.get("times", 1))
        return dict(self.served)


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The second word of the first line (a request's path, a response's status) and lower-cased headers."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    return lines[0].split(" ")[1], headers


def response(status: int, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status} {'OK' if status == 200 else 'Too Many Requests'}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


def upstream_main(chain: str, key: str, events: int, interval: float, out: Connection) -> None:
    async def serve() -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(chain, key)
        ctx.set_alpn_protocols(["http/1.1"])
        server = await asyncio.start_server(Upstream(events, interval).connection, "127.0.0.1", 0, ssl=ctx,
                                            backlog=256)
        out.send(server.sockets[0].getsockname()[1])
        await asyncio.sleep(900)  # the parent terminates us long before; this is the backstop

    asyncio.run(serve())

# ---------------------------------------------------------------------------------------------- load generator


@dataclass(frozen=True)
class Target:
    upstream_port: int
    upstream_ca: str
    proxy_port: int | None = None  # None: straight to the upstream
    proxy_ca: str = ""
    proxy_pid: int | None = None


async def connect(t: Target, direct: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to api.kimi.com: through an HTTP CONNECT tunnel, or straight to the upstream."""
    ctx = ssl.create_default_context(cafile=t.upstream_ca if direct or t.proxy_port is None else t.proxy_ca)
    ctx.set_alpn_protocols(["http/1.1"])
    if direct or t.proxy_port is None:
        return await asyncio.open_connection("127.0.0.1", t.upstream_port, ssl=ctx, server_hostname=HOST)
    r, w = await asyncio.open_connection("127.0.0.1", t.proxy_port)
    w.write(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"CONNECT refused: {head[:60]!r}")
    await w.start_tls(ctx, server_hostname=HOST)
    return r, w


def request_bytes(stream: bool, path: str = PATH, body: bytes | None = None) -> bytes:
    if body is None:
        body = json.dumps({"model": "kimi-for-coding", "stream": stream,
                           "messages": [{"role": "user", "content": "Say hi"}]}).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer sk-client-placeholder\r\n"
            f"Content-Type: application/json\r\nUser-Agent: kimi-rotate-bench/1\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def read_response(r: asyncio.StreamReader) -> tuple[int, float | None, bool, bytes]:
    """Status, when the first SSE event arrived, whether the connection is done, and the body (first chunk)."""
    status, headers = parse_head(await r.readuntil(b"\r\n\r\n"))
    first, body, closed = None, b"", False
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while (size := int((await r.readuntil(b"\r\n")).split(b";")[0], 16)) > 0:
            chunk = await r.readexactly(size + 2)
            if first is None and b"data:" in chunk:
                first, body = time.perf_counter(), chunk
        await r.readuntil(b"\r\n")
    elif "content-length" in headers:
        body = await r.readexactly(int(headers["content-length"]))
        closed = headers.get("connection", "").lower() == "close"
    else:
        body, closed = await r.read(), True
    if first is None and b"data:" in body:
        first = time.perf_counter()
    return int(status), first, closed, body


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process, all threads (Linux; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class Samples:
    lat: list[float] = field(default_factory=list)
    ttfe: list[float] = field(default_factory=list)
    leg: list[float] = field(default_factory=list)  # client sent -> upstream read the request
    errors: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0

    def summary(self, stream: bool) -> dict[str, float]:
        n = len(self.lat)
        out = {"n": n, "errors": self.errors, "rps": n / self.elapsed if self.elapsed else 0.0,
               "p50_ms": pct(self.lat, 50) * 1e3, "p90_ms": pct(self.lat, 90) * 1e3,
               "to_upstream_p50_ms": pct(self.leg, 50) * 1e3,
               "proxy_cpu_ms_per_req": self.cpu * 1e3 / max(1, n)}
        if stream:
            out.update(ttfe_p50_ms=pct(self.ttfe, 50) * 1e3, ttle_p50_ms=out["p50_ms"])
        return out


async def phase(t: Target, stream: bool, conc: int, n: int, acc: Samples) -> None:
    """n requests over conc keep-alive connections (opened before the clock starts), added to acc."""
    conns = [await connect(t) for _ in range(conc)]
    req, left = request_bytes(stream), n
    cpu0, start = cpu_seconds(t.proxy_pid), time.perf_counter()

    async def worker(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal left
        while left > 0 and time.perf_counter() < start + PHASE_LIMIT:
            left -= 1
            t0 = time.perf_counter()
            try:
                w.write(req)
                status, first, closed, body = await asyncio.wait_for(read_response(r), REQUEST_TIMEOUT)
            except (OSError, EOFError, TimeoutError, ValueError):
                status, first, closed, body = 0, None, True, b""
            if status == 200:
                acc.lat.append(time.perf_counter() - t0)
                acc.ttfe += [] if first is None else [first - t0]
                acc.leg += [float(m[1]) - t0 for m in T_UP.finditer(body[:200])][:1]
            else:
                acc.errors += 1
            if closed:
                w.close()
                try:
                    r, w = await connect(t)
                except OSError:
                    acc.errors += 1
                    return
        w.close()

    await asyncio.gather(*(worker(r, w) for r, w in conns))
    acc.elapsed += time.perf_counter() - start
    acc.cpu += cpu_seconds(t.proxy_pid) - cpu0


async def control(t: Target, path: str, body: dict[str, Any] | None = None) -> dict[str, int]:
    r, w = await connect(t, direct=True)
    try:
        w.write(request_bytes(False, path, json.dumps(body or {}).encode()))
        return dict(json.loads((await asyncio.wait_for(read_response(r), REQUEST_TIMEOUT))[3]))
    finally:
        w.close()


async def failover(t: Target, samples: int) -> dict[str, float]:
    """Streaming requests whose key answers 429 first: the proxy must retry them on its next key."""
    r, w = await connect(t)
    ttfe: list[float] = []
    errors = 0
    for _ in range(samples):
        w.write(request_bytes(False))  # the upstream learns which key this proxy uses now...
        await asyncio.wait_for(read_response(r), REQUEST_TIMEOUT)
        before = (await control(t, "/_bench/fail", {"key": None, "times": 1}))["429"]  # ...and refuses it once
        t0 = time.perf_counter()
        w.write(request_bytes(True))
        status, first, closed, _ = await asyncio.wait_for(read_response(r), REQUEST_TIMEOUT)
        failed_over = (await control(t, "/_bench/stats"))["429"] == before + 1
        if status == 200 and first is not None and failed_over and not closed:
            ttfe.append(first - t0)
        else:
            errors += 1
            break  # the proxy is not in the state this measurement needs
    w.close()
    return {"n": len(ttfe), "errors": errors, "ttfe_p50_ms": pct(ttfe, 50) * 1e3}


def loadgen_main(targets: dict[str, Target], plan: dict[str, int], out: Connection) -> None:
    """Every phase against every target, in alternating slices."""
    async def run() -> dict[str, dict[str, dict[str, float]]]:
        for t in targets.values():  # warm up: certificates, connection pools, caches
            await phase(t, False, 10, plan["warmup"], Samples())
            await phase(t, True, 2, 6, Samples())
        res: dict[str, dict[str, dict[str, float]]] = {name: {} for name in targets}
        names = list(targets)
        for ph, stream, conc in PHASES:
            acc = {name: Samples() for name in names}
            for i in range(SLICES):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    await phase(targets[name], stream, conc, -(-plan[ph] // SLICES), acc[name])
            for name in names:
                res[name][ph] = acc[name].summary(stream)
        for name in [n for n in names if n not in ("direct", "stock")]:
            res[name]["failover"] = await failover(targets[name], plan["failover"])
        return res

    out.send(asyncio.run(run()))

# ---------------------------------------------------------------------------------------------- orchestration


MAKE_STORE = """
import secrets, sys, time
from pathlib import Path
from kimi_rotator.models import Surface
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore
if len(sys.argv) > 2:  # a Redis store (kimi_store), sealed with the secret file in the home folder
    from kimi_rotator.store import open_store
    store = open_store(sys.argv[2], Path(sys.argv[1]))
else:
    store = SqliteStore(Path(sys.argv[1]))
for i in range(4):
    store.add_key(NewKey(secret=f"sk-kimi-bench{i}-{secrets.token_hex(12)}", name=f"bench-{i}",
                         surface=Surface.KIMI_CODE, account=f"bench-{i}"), time.time())
store.close()
"""


def make_store(home: Path, root: Path = ROOT, store_url: str | None = None) -> None:
    """4 kimi-code keys, each its own account, so an account-scope 429 cools only that key. Made by the code that
    will serve it (`root`): an older baseline cannot open a store of a newer schema. With `store_url` (a kimi_store
    URL) the keys go there, sealed with a secret file made in `home`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    args = [str(home)] + ([store_url] if store_url else [])
    subprocess.run([sys.executable, "-c", MAKE_STORE, *args], env=env, check=True, cwd=root)  # -c imports from cwd


def proxy_command(kind: str, port: int, confdir: Path, up_port: int, ca: Path, root: Path = ROOT,
                  extra_sets: tuple[str, ...] = ()) -> list[str]:
    sets = [f"confdir={confdir}", f"ssl_verify_upstream_trusted_ca={ca}", *extra_sets]
    if kind != "stock":
        sets.append(f"kimi_resolve={HOST}=127.0.0.1:{up_port}")
    args = [a for s in sets for a in ("--set", s)]
    script = confdir / "stock_route.py" if kind == "stock" else root / "kimi_rotate.py"
    if kind == METRICS_CONFIG:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            sets.append(f"kimi_metrics=127.0.0.1:{s.getsockname()[1]}")
        args = [a for s in sets for a in ("--set", s)]
    if kind not in ("slim", "slim_old", METRICS_CONFIG):
        return [str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "-p", str(port), "-s", str(script), *args]
    if (BIN / "kimi-rotate").exists():
        return [str(BIN / "kimi-rotate"), "proxy", "--port", str(port), *args]
    code = f"from kimi_rotator.proxy import run, ProxyConfig; run(ProxyConfig(port={port}, sets={sets!r}))"
    return [sys.executable, "-c", code]


def start_proxy(kind: str, work: Path, up_port: int, ca: Path, baseline: Path | None = None,
                store_url: str | None = None) -> tuple[subprocess.Popen[bytes], Target, str]:
    """A proxy of `kind` in `work`, on its own store of 4 keys: the SQLite file in work/home, or with `store_url` the
    Redis store there (the proxy gets kimi_store=store_url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    confdir = work / "confdir"
    confdir.mkdir(parents=True)
    (confdir / "stock_route.py").write_text(STOCK_SCRIPT.format(port=up_port, host=HOST))
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["KIMI_ROTATE_HOME"] = str(work / "home")
    root = ROOT
    if kind in BASELINE_CONFIGS:  # the same interpreter and mitmproxy; the baseline's kimi_rotator comes first
        assert baseline is not None
        root = baseline
        env["PYTHONPATH"] = os.pathsep.join([str(baseline), *filter(None, [env.get("PYTHONPATH")])])
    if kind != "stock":
        make_store(work / "home", root, store_url)
    cmd = proxy_command(kind, port, confdir, up_port, ca, root, (f"kimi_store={store_url}",) if store_url else ())
    with (work / "proxy.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            if (confdir / "mitmproxy-ca-cert.pem").exists():
                target = Target(up_port, str(ca), port, str(confdir / "mitmproxy-ca-cert.pem"), proc.pid)
                return proc, target, ("PYTHONPATH=" + str(root) + " " if root != ROOT else "") + shlex.join(cmd)
        except OSError:
            time.sleep(0.05)
    stop_proxy(proc)
    raise RuntimeError(f"{kind} proxy did not start:\n{(work / 'proxy.log').read_text()[-2000:]}")


def stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def spawn(target: Any, *args: Any) -> tuple[Any, Connection]:
    """Start target(*args, pipe) in a fresh process; it answers through the pipe."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(*args, send), daemon=True)
    p.start()
    return p, recv


def answer(p: Any, recv: Connection, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not recv.poll(0.2):
        if not p.is_alive() and not recv.poll(0):
            raise RuntimeError(f"{p.name} died (exit code {p.exitcode}); see its traceback above")
        if time.monotonic() > deadline:
            p.terminate()
            raise RuntimeError(f"{p.name} gave no answer in {timeout:.0f} s")
    try:
        return recv.recv()
    except EOFError:
        raise RuntimeError(f"{p.name} died (exit code {p.exitcode}); see its traceback above") from None


def run_round(work: Path, up_port: int, ca: Path, plan: dict[str, int], timeout: float,
              commands: dict[str, str], configs: tuple[str, ...], baseline: Path | None) -> Any:
    """Fresh proxies of every kind side by side, measured by one load generator process."""
    targets = {"direct": Target(up_port, str(ca))}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for kind in configs:
            proc, targets[kind], cmd = start_proxy(kind, work / kind, up_port, ca, baseline)
            procs.append(proc)
            commands.setdefault(kind, cmd)
        return answer(*spawn(loadgen_main, targets, plan), timeout)
    except RuntimeError as e:
        logs = "".join(f"\n{p}:\n{p.read_text()[-1500:]}" for p in work.glob("*/proxy.log"))
        raise RuntimeError(f"{e}{logs}") from None
    finally:
        for proc in procs:
            stop_proxy(proc)

# ---------------------------------------------------------------------------------------------- report


TABLES = (
    ("non-streaming JSON", [("json_c1.rps", "req/s c1"), ("json_c1.p50_ms", "p50 c1"), ("json_c1.p90_ms", "p90 c1"),
                            ("json_c1.to_upstream_p50_ms", "up-leg c1"),
                            ("json_c10.rps", "req/s c10"), ("json_c10.p50_ms", "p50 c10"),
                            ("json_c10.p90_ms", "p90 c10"), ("json_c10.proxy_cpu_ms_per_req", "CPU/req")]),
    ("streaming SSE", [("sse_c1.ttfe_p50_ms", "TTFE c1"), ("sse_c1.to_upstream_p50_ms", "up-leg c1"),
                       ("sse_c1.ttle_p50_ms", "TTLE c1"),
                       ("sse_c10.ttfe_p50_ms", "TTFE c10"), ("sse_c10.ttle_p50_ms", "TTLE c10"),
                       ("sse_c10.proxy_cpu_ms_per_req", "CPU/req"), ("failover.ttfe_p50_ms", "fail TTFE")]),
)


def val(r: dict[str, Any], cfg: str, key: str) -> float:
    ph, metric = key.split(".")
    return float(r.get(cfg, {}).get(ph, {}).get(metric, float("nan")))


def report(rounds: list[dict[str, Any]], configs: tuple[str, ...] = CONFIGS) -> tuple[list[str], dict[str, Any]]:
    medians = {cfg: {key: statistics.median(val(r, cfg, key) for r in rounds) for _, cols in TABLES for key, _ in cols}
               for cfg in ("direct", *configs)}
    lines: list[str] = []
    for title, cols in TABLES:
        lines += ["", f"{title + ' (medians; ms)':30}" + "".join(f"{h:>10}" for _, h in cols)]
        for cfg in ("direct", *configs):
            cells = (medians[cfg][key] for key, _ in cols)
            lines.append(f"{LABELS[cfg]:30}" + "".join(
                f"{'-' if v != v else f'{v:.0f}' if v >= 100 else f'{v:.2f}':>10}" for v in cells))
    rtt = medians["direct"]["json_c1.p50_ms"]
    rows = [("throughput ratio, c=1", "json_c1.rps", "ratio", 0.85, 1.5),
            ("throughput ratio, c=10", "json_c10.rps", "ratio", 0.85, 1.5),
            ("CPU per request ratio, JSON c=10", "json_c10.proxy_cpu_ms_per_req", "ratio", None, None),
            ("CPU per request ratio, SSE c=10", "sse_c10.proxy_cpu_ms_per_req", "ratio", None, None),
            ("p50 added over stock, c=1 (ms)", "json_c1.p50_ms", "diff", 0.5, None),
            ("first SSE event over stock, c=1 (ms)", "sse_c1.ttfe_p50_ms", "diff", 5.0, 5.0),
            ("failover first-event penalty, c=1 (ms)", "failover.ttfe_p50_ms", "penalty", rtt + 5, rtt + 5)]
    lines += ["", f"{'against stock, paired per round':40}{'b addon':>10}{'target':>14}{'c slim':>10}{'target':>14}"]
    checks: dict[str, Any] = {}
    for label, key, kind, *targets in rows:
        out = f"{label:40}"
        for cfg, target in zip(("addon", "slim"), targets, strict=True):
            per_round = []  # a failover penalty is against the same proxy's TTFE without failover
            for r in rounds:
                base = val(r, cfg, "sse_c1.ttfe_p50_ms") if kind == "penalty" else val(r, "stock", key)
                per_round.append(val(r, cfg, key) / base if kind == "ratio" else val(r, cfg, key) - base)
            v = statistics.median(per_round)
            met = None if target is None else v >= target if kind == "ratio" else v <= target
            checks[f"{cfg}: {label}"] = {"value": v, "per_round": per_round, "target": target, "met": met}
            tgt = "" if target is None else f"{'>=' if kind == 'ratio' else '<='}{target:.2f} {'ok' if met else 'MISS'}"
            out += f"{v:10.2f}{tgt:>14}"
        lines.append(out)
    if "addon_old" in configs:
        lines += baseline_lines(rounds, checks)
    if METRICS_CONFIG in configs:
        lines += baseline_lines(rounds, checks, ((METRICS_CONFIG, "slim"),), "metrics on / off, paired per round",
                                "c+ / c")
    errors = sum(int(p.get("errors", 0)) for r in rounds for c in r.values() for p in c.values())
    lines += ["", f"failed or unexpected requests: {errors}. Failover target: one upstream round trip (direct p50 "
              f"{rtt:.2f} ms) + 5 ms. CPU ratio: proxy CPU per request / stock's (lower is better)."]
    return lines, {"medians": medians, "checks": checks, "errors": errors}


BASELINE_ROWS = (("throughput, JSON c=1", "json_c1.rps"), ("throughput, JSON c=10", "json_c10.rps"),
                 ("p50, JSON c=1", "json_c1.p50_ms"), ("p50, JSON c=10", "json_c10.p50_ms"),
                 ("CPU per request, JSON c=10", "json_c10.proxy_cpu_ms_per_req"),
                 ("first SSE event, c=1", "sse_c1.ttfe_p50_ms"), ("first SSE event, c=10", "sse_c10.ttfe_p50_ms"),
                 ("whole stream, c=10", "sse_c10.ttle_p50_ms"),
                 ("CPU per stream, c=10", "sse_c10.proxy_cpu_ms_per_req"),
                 ("first SSE event after a failover", "failover.ttfe_p50_ms"))


def baseline_lines(rounds: list[dict[str, Any]], checks: dict[str, Any],
                   pairs: tuple[tuple[str, str], ...] = (("addon", "addon_old"), ("slim", "slim_old")),
                   title: str = "new / baseline, paired per round", heads: str = "b / bold  c / cold") -> list[str]:
    """Each (new, old) pair of proxies in the same round, median over rounds of new / old: by default this code
    against the baseline's, with --metrics the slim proxy with metrics against it without."""
    lines = ["", f"{title:40}" + "".join(f"{h:>10}" for h in heads.split("  "))]
    for label, key in BASELINE_ROWS:
        out = f"{label:40}"
        for new, old in pairs:
            per_round = [val(r, new, key) / val(r, old, key) for r in rounds if val(r, old, key)]
            v = statistics.median(per_round) if per_round else float("nan")  # nan: the baseline measured nothing
            checks[f"{new} / {old}: {label}"] = {"value": v, "per_round": per_round}
            out += f"{v:10.3f}"
        lines.append(out)
    lines.append("(throughput: higher is better; latency and CPU: lower is better; 1.000 is no change)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, fewer requests (about 30 s)")
    ap.add_argument("--rounds", type=int, help="rounds, each with fresh proxies (default 3, quick 1)")
    ap.add_argument("--events", type=int, default=5, help="SSE events per streamed reply")
    ap.add_argument("--interval-ms", type=float, default=20.0, help="gap between SSE events after the first")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--baseline", type=Path, help="a checkout of older code, measured beside this one (new/old)")
    ap.add_argument("--metrics", action="store_true", help="also the slim proxy with kimi_metrics on (on/off)")
    args = ap.parse_args()
    baseline = args.baseline.resolve() if args.baseline else None
    if baseline is not None and not (baseline / "kimi_rotate.py").is_file():
        ap.error(f"--baseline {args.baseline}: no kimi_rotate.py there (give a checkout of kimi-rotate)")
    configs = CONFIGS + (BASELINE_CONFIGS if baseline is not None else ()) + ((METRICS_CONFIG,) if args.metrics else ())
    rounds_n = max(1, min(9, args.rounds or (1 if args.quick else 3)))
    plan = ({"warmup": 100, "json_c1": 200, "json_c10": 300, "sse_c1": 16, "sse_c10": 60, "failover": 3}
            if args.quick else
            {"warmup": 200, "json_c1": 500, "json_c10": 1000, "sse_c1": 32, "sse_c10": 120, "failover": 3})
    sys.path.insert(0, str(ROOT))
    import mitmproxy.version

    from tests.certs import make_test_pki

    load_before = os.getloadavg()[0]
    machine: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                               "mitmproxy": mitmproxy.version.VERSION, "platform": platform.platform()}
    command = shlex.join([sys.executable, *sys.argv])
    print(f"machine: nproc {machine['nproc']}, Python {machine['python']}, mitmproxy {machine['mitmproxy']}, "
          f"{machine['platform']}\ncommand: {command}\nplan: {rounds_n} round(s) x {plan}, SSE {args.events} "
          f"events {args.interval_ms:g} ms apart", flush=True)
    rounds: list[dict[str, Any]] = []
    commands: dict[str, str] = {}
    started, budget = time.monotonic(), 100.0 if args.quick else 220.0  # seconds for the whole run
    budget *= len(configs) / len(CONFIGS)  # every round measures every proxy
    with tempfile.TemporaryDirectory(prefix="kimi-bench-") as tmp:
        pki = make_test_pki(Path(tmp) / "pki")
        upstream, port_pipe = spawn(upstream_main, str(pki.server_chain), str(pki.server_key), args.events,
                                    args.interval_ms / 1e3)
        try:
            up_port = answer(upstream, port_pipe, 15)
            for i in range(rounds_n):
                elapsed = time.monotonic() - started
                if i and elapsed * (i + 1) / i > budget:  # another round would overrun: report what we have
                    print(f"stopping after {i} round(s) to stay within {budget:.0f} s", flush=True)
                    break
                try:
                    rounds.append(run_round(Path(tmp) / f"round{i}", up_port, pki.ca_cert, plan,
                                            max(30.0, budget - elapsed), commands, configs, baseline))
                except RuntimeError as e:
                    if not rounds:
                        raise
                    print(f"round {i + 1} failed, reporting the rounds before it: {e}", flush=True)
                    break
                print(f"round {i + 1}/{rounds_n} done at {time.monotonic() - started:.0f} s", flush=True)
        finally:
            upstream.terminate()
            upstream.join(5)
    print("\nrouting: clients CONNECT api.kimi.com:443 through every proxy; stock loads a 6-line script that "
          "rewrites the server address in server_connect (as kimi_resolve does) and streams SSE (as the addon "
          "does), so all see identical client traffic and the same upstream TLS. Commands (round 1):")
    print("\n".join(f"  {kind}: {cmd}" for kind, cmd in commands.items()))
    lines, summary = report(rounds, configs)
    load_after = os.getloadavg()[0]
    machine["loadavg"] = [load_before, load_after]
    busy = max(load_before, load_after) > 1
    lines.append(f"load average before / after: {load_before:.2f} / {load_after:.2f}"
                 + (": other work was running, absolute numbers are noisy; ratios are paired" if busy else ""))
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "command": command, "plan": plan, "proxy_commands":
                                         commands, "sse": {"events": args.events, "interval_ms": args.interval_ms},
                                         "rounds": rounds, **summary}, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
