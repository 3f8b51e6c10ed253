"""Goodput under overload (issue 9 item 6): the pool's capacity used, and the 429s it took, with issue 9's features on
(caps enforced before sending, a fair queue, conversation pins, quota awareness) and off (today's reactive proxy).

    python benchmarks/goodput.py [--seconds 60] [--stated] [--features-off-only] [--quota-only] [--json FILE]

Everything runs on 127.0.0.1: the fake Kimi (tests/fakekimi.py, in this process) stands in for api.moonshot.cn with 4
Open Platform accounts of one key each, added with the CLI to a temporary KIMI_ROTATE_HOME; every phase gets a fresh
`kimi-rotate proxy` on a fresh copy of that store and a fresh fake state. Per mode (on, then off):

- load: per-account caps (--caps RPM/CONCURRENCY, enforced by the fake with Kimi's own 429 texts, "organization max
  RPM: N" and "organization max concurrency: N"); open-loop Poisson arrivals at twice the capacity for --seconds,
  each a streaming request (OpenAI and Anthropic routes alternately) through the proxy with a bounded timeout and no
  retry by the client. Goodput: upstream successes admitted within the run that the client received whole, over the
  capacity. The queue wait is parsed from the proxy's request lines (" (queued 1.234 s)"; none: 0).
- affinity: 8 conversations (prompt_cache_key, or Anthropic metadata.user_id for half), each sending --turns requests
  one after another, caps far above the load: share of each conversation's requests served by the account of its
  first one, and busiest/idlest account load ratio.

Then the quota phase, on 3 Kimi Code accounts (sk-kimi- keys, api.kimi.com) whose fake plans' 5-hour windows reset at
different times (QUOTA_PLANS): kc-expiring's 100 requests' worth left reset in 20 min, within the 1-hour horizon of
quota-aware selection, and would be lost then; kc-mid's and kc-fresh's in 3 h and 5 h. `kimi-rotate check` (with the
proxy's kimi_resolve / ssl_verify_upstream_trusted_ca) records each account's quota in a fresh copy of the store; then
120 new conversations, 4 at a time, go through the proxy: where they were served, what each account has left. Three
proxies: "aware" (every feature on), "blind" (kimi_quota_aware=false, admission and affinity on: the difference is
quota awareness alone) and "reactive" (every feature off, as the "off" mode). kc-fresh is first in the store, so every
proxy starts on it (`list-keys` marks it current), never on kc-expiring: the figures owe nothing to list order.

The "on" run learns the caps from the first 429s, or with --stated is told them first (`kimi-rotate account NAME
--rpm N --concurrency N`). A build without the feature options (mitmproxy refuses an unknown --set) runs the
reactive half only and says so. --features-off-only runs the reactive proxies only; --quota-only the quota phase
only (with --features-off-only: its reactive proxy only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import shlex
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kimi_rotator.envelopes import LOCAL_HEADER

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_proxy import HOST, pct, proxy_command  # noqa: E402
from certs import make_test_pki  # noqa: E402
from fakekimi import FakeKimi  # noqa: E402
from harness import KIMI_HOSTS, ProxyProcess, ensure_mitm_ca, kimi_key, platform_key, run_cli  # noqa: E402
from test_reliability_support import _check_stream  # noqa: E402

FEATURES = ("kimi_admission", "kimi_affinity", "kimi_quota_aware")
ACCOUNTS = tuple(f"acct-{i}" for i in range(1, 5))
KEYS = {a: platform_key(f"gp{i:02d}") for i, a in enumerate(ACCOUNTS, 1)}
ROUTES = (("openai", "https://api.moonshot.cn/v1/chat/completions"),
          ("anthropic", "https://api.moonshot.cn/anthropic/v1/messages"))
EVENTS = 5  # SSE events per load reply; the reply lasts --duration
ID = "x-goodput-id"  # names each request, so the fake's records join the client's
QUEUED = re.compile(r"queued ([0-9.]+) s")
REQUEST_LINE = re.compile(r"^\[[\d:.]+\] \S+ POST /\S*(?:chat/completions|messages) ")
UNKNOWN = re.compile(r"Unknown option\(s\): ([\w, ]+)")
AFFINITY_CAPS = (100_000, 64)  # RPM, concurrency: no conversation ever comes near them
TARGETS = {"goodput_share": 0.95, "upstream_429_per_100": 2.0, "affinity_min_share": 0.99, "load_ratio": 1.5}
# Quota phase: Kimi Code accounts, added to the store in this order (so a pool with no history is on kc-fresh, the
# account a quota-aware pick should leave alone), each with a 5-hour window (limit, used, resets in s) and ample weekly
# quota. kc-expiring's 100 left vanish at its reset in 20 min, within pool.QUOTA_HORIZON (1 h); the others' do not.
QUOTA_PLANS = {"kc-fresh": (300, 0, 5 * 3600), "kc-mid": (300, 100, 3 * 3600), "kc-expiring": (300, 200, 20 * 60)}
WEEKLY = (5000, 1000, 4 * 86400)  # limit, used, resets in s: never the binding window here
EXPIRING = "kc-expiring"
QUOTA_KEYS = {a: kimi_key(f"qa{i:02d}") for i, a in enumerate(QUOTA_PLANS, 1)}
QUOTA_REQUESTS, QUOTA_PARALLEL = 120, 4  # more than kc-expiring has left, so the run also shows its running out
# The quota phase's proxies, FEATURES each on or off: "blind" differs from "aware" in quota awareness alone;
# "reactive" is the whole benchmark's "off" (every feature off).
QUOTA_ROWS = {"aware": (True, True, True), "blind": (True, True, False), "reactive": (False, False, False)}
KC_ROUTES = (("openai", f"https://{HOST}/coding/v1/chat/completions"),
             ("anthropic", f"https://{HOST}/coding/v1/messages"))
USAGES = "/coding/v1/usages"


@dataclass(frozen=True)
class Caps:
    rpm: int
    concurrency: int


def parse_caps(text: str) -> list[Caps]:
    caps = [Caps(*map(int, part.split("/"))) for part in text.split(",")]
    if len(caps) != len(ACCOUNTS) or any(c.rpm < 1 or c.concurrency < 1 for c in caps):
        raise ValueError(text)
    return caps


def capacity(caps: list[Caps], seconds: float, duration: float) -> float:
    """Most requests the caps admit in `seconds`: per account min(RPM x max(1, T/60), concurrency x T / D). For
    T = 60 s (and multiples) that is T x the steady rate, sum of min(RPM/60, concurrency/D) per second; a shorter run
    may spend a whole minute's RPM, as the fake's sliding minute allows."""
    return sum(min(c.rpm * max(1.0, seconds / 60), c.concurrency * seconds / duration) for c in caps)


# ---------------------------------------------------------------------------------------------- rig


class CliProxy(ProxyProcess):
    """`kimi-rotate proxy`, the slim master users run, as bench_proxy.py starts it (on api.kimi.com), also sending
    the Open Platform hosts to the fake, with `options` on top; started, logged and stopped as tests/harness.py
    does."""

    cmd: list[str] | None = None
    upstream: tuple[int, Path] = (0, Path())  # the fake's port and CA

    def command(self) -> list[str]:
        if self.cmd is None:  # one port for the life of the object
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            up_port, ca = self.upstream
            resolve = [("kimi_resolve", f"{host}=127.0.0.1:{up_port}") for host in KIMI_HOSTS if host != HOST]
            sets = [a for name, value in resolve + self.options for a in ("--set", f"{name}={value}")]
            self.cmd = proxy_command("slim", port, self.confdir, up_port, ca) + sets
        return self.cmd


@dataclass
class Rig:
    work: Path
    fake: FakeKimi
    pristine: Path  # a store of the 4 keys, added with the CLI; each phase runs on a copy
    confdir: Path  # one mitmproxy CA for every proxy
    stated: bool
    runs: int = 0
    commands: list[str] = field(default_factory=list)

    quota_pristine: Path = Path()  # the quota phase's Kimi Code keys, in QUOTA_PLANS order

    def home(self, pristine: Path) -> Path:
        """A fresh copy of a store."""
        self.runs += 1
        home = self.work / f"home{self.runs}"
        shutil.copytree(pristine, home)
        return home

    def proxy(self, mode: str, sets: list[tuple[str, str]], caps: list[Caps]) -> CliProxy:
        """A proxy on a fresh copy of the store (caps stated first with --stated, in the "on" mode)."""
        home = self.home(self.pristine)
        if self.stated and mode == "on":
            for account, c in zip(ACCOUNTS, caps, strict=True):
                r = run_cli(home, "account", account, "--rpm", str(c.rpm), "--concurrency", str(c.concurrency))
                if r.returncode != 0:
                    raise RuntimeError(f"could not state the caps of {account}: {r.stderr.strip()}")
        return self.launch(home, sets)

    def launch(self, home: Path, sets: list[tuple[str, str]]) -> CliProxy:
        proxy = CliProxy(self.work / f"proxy{self.runs}", home, sets, confdir=self.confdir)
        proxy.upstream = (self.fake.port, self.fake.pki.ca_cert)
        proxy.start()
        self.commands.append(shlex.join(proxy.command()))
        return proxy

    def upstream_sets(self) -> list[str]:
        """`--set` arguments that send api.kimi.com to the fake and trust its CA, as the proxy's (for `check`)."""
        return ["--set", f"kimi_resolve={HOST}=127.0.0.1:{self.fake.port}",
                "--set", f"ssl_verify_upstream_trusted_ca={self.fake.pki.ca_cert}"]


def make_rig(work: Path, stated: bool, duration: float) -> Rig:
    pki = make_test_pki(work / "pki")
    fake = FakeKimi(pki, events=EVENTS, interval=duration / EVENTS, max_connections=2048).start()
    pristine = work / "pristine"
    for i, account in enumerate(ACCOUNTS, 1):
        fake.add_key(KEYS[account], account=account, name=account)
        r = run_cli(pristine, "add-key", "-", f"key-{i}", "--account", account, "--surface", "moonshot-cn",
                    input=KEYS[account] + "\n")
        if r.returncode != 0:
            raise RuntimeError(f"kimi-rotate add-key failed: {r.stderr.strip()}")
    if stated and run_cli(pristine, "account", "--help").returncode != 0:
        raise RuntimeError("--stated needs `kimi-rotate account NAME --rpm N --concurrency N`, which this build lacks")
    quota_pristine = work / "quota-pristine"
    for account in QUOTA_PLANS:  # kc-fresh first: a pool with no history is on it
        fake.add_key(QUOTA_KEYS[account], account=account, name=account)
        r = run_cli(quota_pristine, "add-key", "-", account, "--account", account, "--surface", "kimi-code",
                    input=QUOTA_KEYS[account] + "\n")
        if r.returncode != 0:
            raise RuntimeError(f"kimi-rotate add-key failed: {r.stderr.strip()}")
    ensure_mitm_ca(work / "mitm")
    return Rig(work, fake, pristine, work / "mitm", stated, quota_pristine=quota_pristine)


def launch(features: Mapping[str, bool], missing: set[str],
           start_proxy: Callable[[list[tuple[str, str]]], CliProxy]) -> tuple[CliProxy | None, set[str]]:
    """A proxy with each feature option set as `features` says (None: this build lacks one that must be on), and the
    feature options this build lacks. An unknown option makes the proxy refuse to start, which is how a build without
    them shows; one that must be off is then left out (lacking it, the build is without that feature)."""
    while True:  # each pass that does not return learns of a missing option: at most len(FEATURES) + 1 passes
        if any(on and name in missing for name, on in features.items()):
            return None, missing
        sets = [(name, "true" if on else "false") for name, on in features.items() if name not in missing]
        try:
            return start_proxy(sets), missing
        except RuntimeError as e:
            found = UNKNOWN.search(str(e))
            unknown = {n.strip() for n in found.group(1).split(",")} if found else set()
            if not unknown or not unknown <= set(FEATURES) - missing:
                raise  # not (only) a feature this build lacks
            missing = missing | unknown


def start(rig: Rig, mode: str, caps: list[Caps], missing: set[str]) -> tuple[CliProxy | None, set[str]]:
    """The proxy of `mode` (None: this build cannot run it) and the feature options this build lacks. "on" sets
    every feature to true (their default), "off" each the build has to false."""
    return launch({name: mode == "on" for name in FEATURES}, missing, lambda sets: rig.proxy(mode, sets, caps))


# ---------------------------------------------------------------------------------------------- clients


@dataclass
class Outcome:
    id: str
    kind: str  # ok, 429-local, 429-upstream, timeout, error
    sent: float
    took: float
    detail: str = ""


def body_for(fmt: str, text: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "kimi-k2.6", "stream": True, "messages": [{"role": "user", "content": text}]}
    if fmt == "anthropic":
        body["max_tokens"] = 16
    return {**body, **(extra or {})}


async def send(client: httpx.AsyncClient, fmt: str, url: str, body: dict[str, Any], rid: str, events: int,
               timeout: float, headers: dict[str, str] | None = None) -> Outcome:
    """One streaming request, never retried: its outcome as the client saw it."""
    sent = time.monotonic()
    hdrs = {"authorization": "Bearer sk-placeholder-from-client", ID: rid, **(headers or {})}
    try:
        async with asyncio.timeout(timeout), client.stream("POST", url, json=body, headers=hdrs) as r:
            raw = b"".join([chunk async for chunk in r.aiter_raw()])
    except TimeoutError:
        return Outcome(rid, "timeout", sent, time.monotonic() - sent)
    except (httpx.HTTPError, OSError) as e:
        return Outcome(rid, "error", sent, time.monotonic() - sent, type(e).__name__)
    took = time.monotonic() - sent
    if r.status_code == 429:
        return Outcome(rid, "429-local" if LOCAL_HEADER in r.headers else "429-upstream", sent, took)
    if r.status_code != 200:
        return Outcome(rid, "error", sent, took, f"status {r.status_code}")
    problem = _check_stream(fmt, raw, events)
    return Outcome(rid, "error" if problem else "ok", sent, took, problem or "")


def clients(proxy: CliProxy, n: int, timeout: float) -> list[httpx.AsyncClient]:
    verify = ssl.create_default_context(cafile=str(proxy.ca))
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    return [httpx.AsyncClient(proxy=proxy.url, verify=verify, trust_env=False, timeout=timeout, limits=limits)
            for _ in range(n)]


async def open_loop(proxy: CliProxy, rate: float, seconds: float, timeout: float,
                    seed: int) -> tuple[float, list[Outcome]]:
    """Poisson arrivals at `rate` per second for `seconds`, spread over 16 clients; then wait for every answer."""
    rng = random.Random(seed)
    pool = clients(proxy, 16, timeout)
    tasks: list[asyncio.Task[Outcome]] = []
    t0 = time.monotonic()
    at = t0
    try:
        while (at := at + rng.expovariate(rate)) < t0 + seconds:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            fmt, url = ROUTES[len(tasks) % 2]
            body = body_for(fmt, f"load {len(tasks)}")
            tasks.append(asyncio.create_task(
                send(pool[len(tasks) % len(pool)], fmt, url, body, f"load-{len(tasks)}", EVENTS, timeout)))
        return t0, list(await asyncio.gather(*tasks))
    finally:
        await asyncio.gather(*(c.aclose() for c in pool))


async def conversations(proxy: CliProxy, n: int, turns: int, timeout: float) -> list[Outcome]:
    """`n` conversations, each `turns` requests one after another, the history growing as a chat's does."""
    pool = clients(proxy, n, timeout)
    fast = {"x-fake-events": "2", "x-fake-interval": "0.05"}

    async def talk(i: int) -> list[Outcome]:
        fmt, url = ROUTES[i % 2]
        pin = {"prompt_cache_key": f"conv-{i}"} if fmt == "openai" else {"metadata": {"user_id": f"user-conv-{i}"}}
        history: list[dict[str, str]] = []
        out = []
        for t in range(turns):
            history.append({"role": "user", "content": f"conversation {i} question {t} " * 8})
            body = {**body_for(fmt, "", pin), "messages": list(history)}
            out.append(await send(pool[i], fmt, url, body, f"conv{i}-{t}", 2, timeout, fast))
            history.append({"role": "assistant", "content": f"answer {t}"})
        return out

    try:
        return [o for convo in await asyncio.gather(*(talk(i) for i in range(n))) for o in convo]
    finally:
        await asyncio.gather(*(c.aclose() for c in pool))


async def new_conversations(proxy: CliProxy, n: int, parallel: int, timeout: float) -> list[Outcome]:
    """`n` requests to Kimi Code, `parallel` at a time, each the first of a new conversation (a first message of its
    own, no session id), OpenAI and Anthropic routes alternately."""
    pool = clients(proxy, parallel, timeout)
    fast = {"x-fake-events": "2", "x-fake-interval": "0.02"}
    numbers = iter(range(n))  # shared by the workers: n requests in all

    async def work(client: httpx.AsyncClient) -> list[Outcome]:
        out = []
        for i in numbers:
            fmt, url = KC_ROUTES[i % 2]
            body = body_for(fmt, f"new task {i}: refactor module {i}", {"model": "kimi-for-coding"})
            out.append(await send(client, fmt, url, body, f"quota-{i}", 2, timeout, fast))
        return out

    try:
        return [o for done in await asyncio.gather(*(work(c) for c in pool)) for o in done]
    finally:
        await asyncio.gather(*(c.aclose() for c in pool))


# ---------------------------------------------------------------------------------------------- phases


def queue_waits(log: str) -> list[float]:
    """The queue wait of each inference request the proxy logged (0 when its line has no "(queued N s)")."""
    return [float(m[1]) if (m := QUEUED.search(line)) else 0.0
            for line in log.splitlines() if REQUEST_LINE.match(line)]


def load_phase(rig: Rig, proxy: CliProxy, caps: list[Caps], args: argparse.Namespace) -> dict[str, Any]:
    fake = rig.fake
    cap = capacity(caps, args.seconds, args.duration)
    try:
        t0, outcomes = asyncio.run(open_loop(proxy, 2 * cap / args.seconds, args.seconds, args.timeout, args.seed))
    finally:
        proxy.stop()
    seen = [s for s in fake.requests if s.method == "POST"]
    ok_ids = {o.id for o in outcomes if o.kind == "ok"}
    good = [s for s in seen if s.status == 200 and s.headers.get(ID) in ok_ids and t0 <= s.at <= t0 + args.seconds]
    upstream_ok = sum(1 for s in seen if s.status == 200)
    upstream_429 = sum(fake.account_counts(429).values())
    waits = queue_waits(proxy.log_text())
    waited = [w for w in waits if w > 0]
    kinds = Counter(o.kind for o in outcomes)
    return {
        "capacity": round(cap, 1), "offered": len(outcomes), "goodput": len(good),
        "goodput_share": len(good) / cap, "client_ok": kinds["ok"],
        "upstream_ok": upstream_ok, "upstream_429": upstream_429,
        "upstream_429_by_cap": dict(Counter(s.refusal or "other" for s in seen if s.status == 429)),
        "upstream_429_per_100": 100 * upstream_429 / max(1, upstream_ok),
        "client_429_local": kinds["429-local"], "client_429_upstream": kinds["429-upstream"],
        "timeouts": kinds["timeout"], "errors": kinds["error"],
        "error_kinds": dict(Counter(o.detail for o in outcomes if o.kind == "error")),
        "served_per_account": dict(Counter(s.account for s in good)),
        "logged_requests": len(waits),
        "queue_p50_s": pct(waits, 50) if waits else 0.0, "queue_p99_s": pct(waits, 99) if waits else 0.0,
        "waited": len(waited),
        "waited_p50_s": pct(waited, 50) if waited else 0.0, "waited_p99_s": pct(waited, 99) if waited else 0.0,
        "ok_latency_p50_s": pct([o.took for o in outcomes if o.kind == "ok"], 50),
    }


def affinity_phase(rig: Rig, proxy: CliProxy, args: argparse.Namespace) -> dict[str, Any]:
    fake = rig.fake
    try:
        outcomes = asyncio.run(conversations(proxy, 8, args.turns, args.timeout))
    finally:
        proxy.stop()
    served: dict[str, list[str]] = {}  # conversation -> accounts of its successes, in order
    for s in fake.requests:
        rid = s.headers.get(ID, "")
        if s.method == "POST" and s.status == 200 and s.account is not None:
            served.setdefault(rid.split("-")[0], []).append(s.account)
    shares = [accts.count(accts[0]) / len(accts) for accts in served.values()]
    load = {a: 0 for a in ACCOUNTS}
    for accts in served.values():
        for a in accts:
            load[a] += 1
    busiest, idlest = max(load.values()), min(load.values())
    ok = sum(1 for o in outcomes if o.kind == "ok")
    return {
        "conversations": len(served), "requests": len(outcomes), "ok": ok,
        "affinity_min_share": min(shares, default=0.0), "affinity_mean_share": sum(shares) / max(1, len(shares)),
        "per_account": dict(load), "load_ratio": busiest / idlest if idlest else math.inf,
        "cache_hit_share": sum(fake.cache_hits(a) for a in ACCOUNTS) / max(1, ok - len(served)),
    }


def run_mode(rig: Rig, mode: str, caps: list[Caps], args: argparse.Namespace,
             missing: set[str]) -> tuple[dict[str, Any] | None, set[str]]:
    rig.fake.reset()
    for account, c in zip(ACCOUNTS, caps, strict=True):
        rig.fake.set_limit(account, c.rpm, concurrency=c.concurrency)
    proxy, missing = start(rig, mode, caps, missing)
    if proxy is None:
        return None, missing
    print(f"[{mode}] load: {args.seconds:g} s at 2x capacity …", flush=True)
    result = {"load": load_phase(rig, proxy, caps, args)}
    rig.fake.reset()
    rig.fake.enable_context_cache()
    for account in ACCOUNTS:
        rig.fake.set_limit(account, AFFINITY_CAPS[0], concurrency=AFFINITY_CAPS[1])
    print(f"[{mode}] affinity: 8 conversations x {args.turns} requests …", flush=True)
    proxy, missing = start(rig, mode, [Caps(*AFFINITY_CAPS)] * len(ACCOUNTS), missing)
    assert proxy is not None
    result["affinity"] = affinity_phase(rig, proxy, args)
    return result, missing


def quota_row(rig: Rig, row: str, missing: set[str], timeout: float) -> tuple[dict[str, Any] | None, set[str]]:
    """One proxy of the quota phase (None: this build lacks a feature the row needs): the plans of QUOTA_PLANS set
    on the fake, `kimi-rotate check` run on a fresh copy of the store (so it knows each account's quota), then
    QUOTA_REQUESTS new conversations; where they were served, and what quota is left on each account."""
    fake = rig.fake
    fake.reset()
    for account, (limit, used, reset_in) in QUOTA_PLANS.items():
        fake.set_plan(account, window_limit=limit, window_used=used, window_reset_in=reset_in, weekly_limit=WEEKLY[0],
                      weekly_used=WEEKLY[1], weekly_reset_in=WEEKLY[2])
    before = {a: fake.plan_remaining(a)[0] for a in QUOTA_PLANS}
    started_on: list[str] = []
    check_command: list[str] = []

    def checked_proxy(sets: list[tuple[str, str]]) -> CliProxy:
        home = rig.home(rig.quota_pristine)
        checked = run_cli(home, "check", *rig.upstream_sets())
        check_command[:] = ["kimi-rotate", "check", *rig.upstream_sets()]
        if checked.returncode != 0:
            raise RuntimeError(f"kimi-rotate check failed: {(checked.stderr or checked.stdout).strip()}")
        listed = run_cli(home, "list-keys", "--json")
        started_on[:] = [k["name"] for k in json.loads(listed.stdout) if k.get("current")]
        return rig.launch(home, sets)

    proxy, missing = launch(dict(zip(FEATURES, QUOTA_ROWS[row], strict=True)), missing, checked_proxy)
    if proxy is None:
        return None, missing
    t0 = time.monotonic()
    try:
        outcomes = asyncio.run(new_conversations(proxy, QUOTA_REQUESTS, QUOTA_PARALLEL, timeout))
    finally:
        took = time.monotonic() - t0
        proxy.stop()
    after = {a: fake.plan_remaining(a)[0] for a in QUOTA_PLANS}
    inference = [s for s in fake.requests if s.method == "POST" and s.at >= t0]
    served = [s.account for s in inference if s.status == 200]
    kinds = Counter(o.kind for o in outcomes)
    return {
        "requests": len(outcomes), "client_ok": kinds["ok"], "errors": len(outcomes) - kinds["ok"],
        "error_kinds": dict(Counter(o.detail or o.kind for o in outcomes if o.kind != "ok")),
        "started_on": started_on[0] if started_on else None, "first_served": served[0] if served else None,
        "served_per_account": {a: served.count(a) for a in QUOTA_PLANS},
        "expiring_before": before[EXPIRING], "expiring_used": before[EXPIRING] - after[EXPIRING],
        "lost_at_reset": after[EXPIRING], "kept": sum(n for a, n in after.items() if a != EXPIRING),
        "remaining_before": before, "remaining_after": after,
        "upstream_403_plan": sum(1 for s in inference if s.refusal == "plan"),
        "proxy_probes": sum(1 for s in fake.requests if s.path == USAGES and s.at >= t0), "seconds": took,
        "check": shlex.join(check_command),
    }, missing


def quota_phase(rig: Rig, rows: tuple[str, ...], missing: set[str],
                timeout: float) -> tuple[dict[str, dict[str, Any]], set[str]]:
    results: dict[str, dict[str, Any]] = {}
    for row in rows:
        print(f"[quota] {row}: {QUOTA_REQUESTS} new conversations on {len(QUOTA_PLANS)} Kimi Code accounts …",
              flush=True)
        result, missing = quota_row(rig, row, missing, timeout)
        if result is None:
            print(f"[quota] {row}: this build lacks {', '.join(sorted(missing))}: not run", flush=True)
        else:
            results[row] = result
    return results, missing


# ---------------------------------------------------------------------------------------------- report

COLUMNS = (("goodput", "load.goodput_share", "{:.1%}"), ("good", "load.goodput", "{:.0f}"),
           ("429 up/100", "load.upstream_429_per_100", "{:.1f}"),
           ("429 client", "load.client_429s", "{}"), ("timeout", "load.timeouts", "{}"),
           ("errors", "load.errors", "{}"),
           ("wait p50", "load.queue_p50_s", "{:.2f}"), ("p99", "load.queue_p99_s", "{:.2f}"),
           ("waited p50", "load.waited_p50_s", "{:.2f}"), ("p99", "load.waited_p99_s", "{:.2f}"),
           ("pin min", "affinity.affinity_min_share", "{:.1%}"), ("pin mean", "affinity.affinity_mean_share", "{:.1%}"),
           ("load max/min", "affinity.load_ratio", "{:.2f}"), ("cache hits", "affinity.cache_hit_share", "{:.0%}"))


def cell(result: dict[str, Any], key: str, fmt: str) -> str:
    phase, name = key.split(".")
    if name == "client_429s":
        r = result[phase]
        return f"{r['client_429_local']}+{r['client_429_upstream']}"
    return fmt.format(result[phase][name])


def report(results: dict[str, dict[str, Any]]) -> list[str]:
    widths = [max(len(h), 8) for h, _, _ in COLUMNS]
    lines = ["mode " + " ".join(f"{h:>{w}}" for (h, _, _), w in zip(COLUMNS, widths, strict=True))]
    for mode, r in results.items():
        lines.append(f"{mode:<5}" + "".join(f" {cell(r, k, f):>{w}}" for (_, k, f), w in zip(COLUMNS, widths,
                                                                                              strict=True)))
    if "on" in results:
        load, aff = results["on"]["load"], results["on"]["affinity"]
        checks = [("goodput >= 95% of capacity", load["goodput_share"] >= TARGETS["goodput_share"]),
                  ("<= 2 upstream 429 per 100 successes",
                   load["upstream_429_per_100"] <= TARGETS["upstream_429_per_100"]),
                  ("conversation affinity >= 99%", aff["affinity_min_share"] >= TARGETS["affinity_min_share"]),
                  ("load ratio <= 1.5", aff["load_ratio"] <= TARGETS["load_ratio"])]
        lines += ["targets (on): " + "; ".join(f"{name} {'ok' if met else 'MISS'}" for name, met in checks)]
    lines += ["good = upstream successes admitted within the run that reached the client whole; "
              "429 client = the proxy's own 429s + upstream 429s passed on; wait = seconds in the proxy's queue over "
              "all requests, waited = over those that waited; pin = share of a conversation's requests served by its "
              "first account (min, mean over 8); load max/min = busiest / idlest account in the affinity phase."]
    for mode, r in results.items():
        load = r["load"]
        lines.append(f"{mode}: offered {load['offered']}, client ok {load['client_ok']}, upstream 429s by cap "
                     f"{load['upstream_429_by_cap']}, served per account "
                     f"{load['served_per_account']}, errors {load['error_kinds'] or 'none'}, ok latency p50 "
                     f"{load['ok_latency_p50_s']:.2f} s, {load['logged_requests']} request lines logged; affinity "
                     f"per account {r['affinity']['per_account']}")
    return lines


def quota_report(quota: dict[str, dict[str, Any]]) -> list[str]:
    """The quota phase's table: one line per proxy (aware, blind, reactive)."""
    if not quota:
        return []
    plans = ", ".join(f"{a} {limit - used} left, resets in {reset_in / 60:.0f} min"
                      for a, (limit, used, reset_in) in QUOTA_PLANS.items())
    head = ("expiring used", "lost at reset", "kept", "served fresh/mid/expiring", "403 plan", "probes", "ok",
            "started on")
    lines = [f"quota phase: {QUOTA_REQUESTS} new conversations ({QUOTA_PARALLEL} at a time) on 3 Kimi Code accounts "
             f"whose 5-hour windows differ ({plans}); `kimi-rotate check` told the store first",
             "quota    " + " ".join(f"{h:>{max(len(h), 8)}}" for h in head)]
    for row, r in quota.items():
        used = f"{r['expiring_used']}/{r['expiring_before']} {r['expiring_used'] / max(1, r['expiring_before']):.0%}"
        per = "/".join(str(r["served_per_account"][a]) for a in QUOTA_PLANS)
        cells = (used, r["lost_at_reset"], r["kept"], per, r["upstream_403_plan"], r["proxy_probes"],
                 f"{r['client_ok']}/{r['requests']}", r["started_on"] or "?")
        lines.append(f"{row:<8} " + " ".join(f"{c!s:>{max(len(h), 8)}}" for c, h in zip(cells, head, strict=True)))
    lines.append(f"expiring used = 5-hour-window quota of {EXPIRING} spent (of what it had left), lost at reset = what "
                 "it still has (gone at its reset), kept = what the other two have left for later; 403 plan = upstream "
                 "\"usage limit\" answers (the proxy retried them elsewhere), probes = /usages probes the proxy sent. "
                 "aware = every feature on; blind = quota awareness off (kimi_quota_aware=false), admission and "
                 "affinity on, so the difference is quota awareness alone; reactive = every feature off. Every proxy "
                 f"starts on {next(iter(QUOTA_PLANS))} (first in the store, `list-keys` marks it current), never on "
                 f"{EXPIRING}.")
    if "aware" in quota and "blind" in quota:
        aware, blind = quota["aware"], quota["blind"]
        met = aware["lost_at_reset"] == 0 and aware["client_ok"] == aware["requests"]
        lines.append(f"quota target (aware): every request served and no expiring quota lost "
                     f"{'ok' if met else 'MISS'}; expiring quota used {aware['expiring_used']} vs "
                     f"{blind['expiring_used']} quota-blind, kept for later {aware['kept']} vs {blind['kept']}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each load run (default 60)")
    ap.add_argument("--caps", default="120/8,120/8,1200/2,1200/2",
                    help="RPM/CONCURRENCY of each of the 4 accounts (default: two RPM-bound, two concurrency-bound)")
    ap.add_argument("--duration", type=float, default=1.0, help="seconds one load reply streams (default 1)")
    ap.add_argument("--turns", type=int, default=20, help="requests per conversation in the affinity phase")
    ap.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, seconds")
    ap.add_argument("--stated", action="store_true", help="state the caps with the CLI first instead of learning")
    ap.add_argument("--features-off-only", action="store_true", help="run the reactive half only")
    ap.add_argument("--quota-only", action="store_true", help="run the quota phase only (a few seconds per proxy)")
    ap.add_argument("--seed", type=int, default=9, help="seed of the arrival times")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args()
    try:
        caps = parse_caps(args.caps)
    except ValueError:
        ap.error(f"--caps {args.caps!r}: give 4 RPM/CONCURRENCY pairs of whole numbers >= 1, e.g. 60/4,60/4,600/1,"
                 "600/1")
    if not (1 <= args.seconds <= 3600 and 0.05 <= args.duration <= 30 and 1 <= args.turns <= 500
            and 1 <= args.timeout <= 600):
        ap.error("--seconds 1-3600, --duration 0.05-30, --turns 1-500, --timeout 1-600")
    started = time.monotonic()
    command = shlex.join([sys.executable, *sys.argv])
    cap = capacity(caps, args.seconds, args.duration)
    print(f"command: {command}", flush=True)
    if not args.quota_only:
        print(f"pool: 4 accounts, caps (RPM/concurrency) {args.caps}, replies stream {args.duration:g} s; capacity "
              f"sum of min(RPM/60, concurrency/{args.duration:g} s) = {capacity(caps, 60, args.duration) / 60:.2f}/s; "
              f"over {args.seconds:g} s: {cap:.0f} requests (a run shorter than 60 s may spend a whole minute's RPM); "
              f"offered {2 * cap / args.seconds:.2f}/s (2x)", flush=True)
    results: dict[str, dict[str, Any]] = {}
    quota: dict[str, dict[str, Any]] = {}
    missing: set[str] = set()
    work = Path(tempfile.mkdtemp(prefix="kimi-goodput-"))
    try:
        rig = make_rig(work, args.stated and not args.features_off_only, args.duration)
        try:
            for mode in () if args.quota_only else ("off",) if args.features_off_only else ("on", "off"):
                result, missing = run_mode(rig, mode, caps, args, missing)
                if result is None:
                    print(f"this build lacks {', '.join(sorted(missing))}: running the reactive half only", flush=True)
                else:
                    results[mode] = result
            rows = ("reactive",) if args.features_off_only else tuple(QUOTA_ROWS)
            quota, missing = quota_phase(rig, rows, missing, args.timeout)
        finally:
            rig.fake.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = (report(results) if results else []) + quota_report(quota)
    wall = time.monotonic() - started
    caps_line = "" if args.quota_only else f"caps {'stated up front' if args.stated else 'learned from 429s'}; "
    lines.append(f"{caps_line}feature options missing: {', '.join(sorted(missing)) or 'none'}; total wall time "
                 f"{wall:.0f} s")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "caps": [asdict(c) for c in caps], "duration":
                                         args.duration, "seconds": args.seconds, "missing_options": sorted(missing),
                                         "proxies": rig.commands, "results": results, "quota": quota,
                                         "wall_seconds": wall},
                                        indent=2, default=str))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
