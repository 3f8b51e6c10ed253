"""Issue 5 item 2: four proxy processes and a CLI editing keys, all on one store.

How the 10,000+ outcomes are made: part is real traffic (8 client threads send buffered and streaming requests
through the 4 `mitmdump -s kimi_rotate.py` processes while the CLI edits, 5-10 s: several hundred requests, each
attempt counted by the fake upstream), the remainder comes from 4 further processes that drive `LivePool.record`
(the proxies' own write path: in-memory apply, batched background writes, re-reads of other processes' commits)
with 2,400 outcomes each: successes, rate limits, server and request errors. Meanwhile a CLI loop adds, removes,
disables, enables and rotates keys, all in separate processes.

What must hold:
- no lost counter update: for every key still in the store at the end, total/successful/rate-limited/failed counters
  equal what the fake answered with that key plus what the driver processes recorded for it;
- a key removed or disabled by the CLI is not used by any proxy more than 1 s after the CLI command returned.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
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
    ProxyProcess,
    kimi_key,
    prepare_pool,
    read_keys,
    run_cli,
)

from kimi_rotator.models import Strategy
from kimi_rotator.store import HOME_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

COUNTED = [KeySpec(kimi_key(f"c{i:03d}"), f"counted-{i}", account=f"acct-{i}") for i in range(4)]
TOGGLE = KeySpec(kimi_key("t001"), "toggle", account="acct-t")
VICTIM_DISABLE = KeySpec(kimi_key("v001"), "victim-disable", account="acct-v1")
VICTIM_REMOVE = KeySpec(kimi_key("v002"), "victim-remove", account="acct-v2")
EXTRAS = [KeySpec(kimi_key(f"e{i:03d}"), f"extra-{i}", account=f"acct-e{i}") for i in range(1)]
STORE_KEYS = [*COUNTED, TOGGLE, VICTIM_DISABLE, VICTIM_REMOVE]
DRIVERS = 4
OUTCOMES_PER_DRIVER = 2400
TRAFFIC_SECONDS = 5.0

DRIVER = r'''
import asyncio, json, random, sys, time
from pathlib import Path
from kimi_rotator.models import Outcome, OutcomeKind, Scope
from kimi_rotator.pool import LivePool
from kimi_rotator.store_sqlite import SqliteStore

home, n, seed, names = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
KINDS = [("success", OutcomeKind.SUCCESS, Scope.KEY), ("success", OutcomeKind.SUCCESS, Scope.KEY),
         ("rate_limited", OutcomeKind.RATE_LIMITED, Scope.KEY), ("failed", OutcomeKind.SERVER_ERROR, Scope.SERVER),
         ("failed", OutcomeKind.REQUEST_ERROR, Scope.REQUEST)]

async def main():
    store = SqliteStore(home)
    pool = LivePool(store)
    pool.start(asyncio.get_running_loop())
    ids = {k.name: k.id for k in pool.roster.keys}
    rng = random.Random(seed)
    counts = {name: {"total": 0, "success": 0, "rate_limited": 0, "failed": 0} for name in names}
    for i in range(n):
        name = rng.choice(names)
        label, kind, scope = rng.choice(KINDS)
        now = time.time()
        # A rate limit that ends at once: counted, but it never takes the key out of the proxies' rotation.
        until = now if kind is OutcomeKind.RATE_LIMITED else None
        pool.record(ids[name], Outcome(kind=kind, scope=scope, until=until, reason="driver"), now)
        counts[name]["total"] += 1
        counts[name][label] += 1
        if i % 50 == 0:
            await asyncio.sleep(0.002)  # let the writer thread's callbacks run, as a proxy's loop would
    pool.stop()
    store.close()
    print(json.dumps(counts))

asyncio.run(main())
'''


def traffic(proxy: ProxyProcess, stop: threading.Event, n: int, errors: list[str]) -> int:
    """Requests through one proxy until `stop` (bounded by TRAFFIC_SECONDS + 10 s anyway); returns how many."""
    sent = 0
    deadline = time.monotonic() + TRAFFIC_SECONDS + 10
    verify = ssl.create_default_context(cafile=str(proxy.ca))
    with httpx.Client(proxy=proxy.url, verify=verify, trust_env=False, timeout=20) as client:
        while not stop.is_set() and time.monotonic() < deadline:
            stream = sent % 4 == 3
            url, body = (KC_MESSAGES, MESSAGES_BODY) if sent % 2 else (KC_CHAT, CHAT_BODY)
            r = client.post(url, json={**body, "stream": stream},
                            headers={"authorization": "Bearer sk-placeholder", "x-fake-events": "2",
                                     "x-fake-interval": "0.01"})
            sent += 1
            if r.status_code != 200:
                errors.append(f"thread {n}: {r.status_code} {r.text[:200]}")
    return sent


def cli_loop(home: Path, stop: threading.Event, log: list[tuple[str, str, float]], errors: list[str]) -> None:
    """Edit keys with the real CLI while traffic runs; log (command, key name, monotonic time).

    The time is when the command returned (its change is committed by then), except for `enable`: its change
    may be committed, and the key rightly used again, before the process has even exited, so it logs the start."""

    def cli(*args: str, name: str, input: str | None = None) -> None:
        started = time.monotonic()
        r = run_cli(home, *args, input=input)
        if r.returncode != 0:
            errors.append(f"kimi-rotate {args[0]} {name}: {r.stdout} {r.stderr}")
        log.append((args[0], name, started if args[0] == "enable" else time.monotonic()))

    time.sleep(1.0)
    cli("disable", VICTIM_DISABLE.name, name=VICTIM_DISABLE.name)
    cli("remove-key", VICTIM_REMOVE.name, "--yes", name=VICTIM_REMOVE.name)  # it may be the current key
    for spec in EXTRAS:
        if stop.is_set():
            break
        cli("add-key", "-", spec.name, input=spec.secret, name=spec.name)
        cli("disable", TOGGLE.name, name=TOGGLE.name)
        cli("rotate", name="")
        cli("remove-key", spec.name, "--yes", name=spec.name)
        cli("enable", TOGGLE.name, name=TOGGLE.name)


def test_four_proxies_and_the_cli_share_one_store(
    tmp_path: Path, pki: Any, mitm_confdir: Path, fake_kimi: FakeKimi
) -> None:
    fake = fake_kimi
    home = tmp_path / "home"
    options = prepare_pool(fake, pki.ca_cert, home, STORE_KEYS, fake_specs=[*STORE_KEYS, *EXTRAS],
                           strategy=Strategy.ROUND_ROBIN)
    proxies = [ProxyProcess(tmp_path / f"proxy{i}", home, options, confdir=mitm_confdir) for i in range(4)]
    drivers: list[subprocess.Popen[str]] = []
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(ProxyProcess.start, proxies))

        stop = threading.Event()
        errors: list[str] = []
        cli_log: list[tuple[str, str, float]] = []
        env = {HOME_ENV: str(home), "PYTHONUNBUFFERED": "1"}
        names = ",".join(s.name for s in COUNTED)
        drivers = [
            subprocess.Popen([sys.executable, "-c", DRIVER, str(home), str(OUTCOMES_PER_DRIVER), str(seed), names],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for seed in range(DRIVERS)
        ]
        with ThreadPoolExecutor(9) as pool:
            sent = [pool.submit(traffic, proxies[i % 4], stop, i, errors) for i in range(8)]
            editor = pool.submit(cli_loop, home, stop, cli_log, errors)
            time.sleep(TRAFFIC_SECONDS)
            editor.result(timeout=60)
            stop.set()
            requests_sent = sum(f.result(timeout=60) for f in sent)
        driven: list[dict[str, dict[str, int]]] = []
        for d in drivers:
            out, err = d.communicate(timeout=120)
            assert d.returncode == 0, err
            driven.append(json.loads(out))
    finally:
        for d in drivers:
            if d.poll() is None:
                d.kill()
        for p in proxies:
            p.stop()  # SIGTERM: each proxy writes what it still holds

    assert errors == [], errors[:10]
    seen = fake.requests
    assert len(seen) >= 300, len(seen)  # a real share of the outcomes went through real proxies
    assert all(p.proc is None for p in proxies)

    # -- no lost counter update ---------------------------------------------------------------------------------------
    expected: dict[str, Counter[str]] = {}
    for s in seen:
        c = expected.setdefault(s.key_name or "?", Counter())
        c["total"] += 1
        c["success" if s.status == 200 else "rate_limited" if s.status == 429 else "failed"] += 1
    for counts in driven:
        for name, c in counts.items():
            expected.setdefault(name, Counter()).update(c)
    outcomes = sum(c["total"] for c in expected.values())
    assert outcomes >= 10_000, outcomes
    final = {k.name: k for k in read_keys(home)}
    for name in [s.name for s in COUNTED] + [TOGGLE.name, VICTIM_DISABLE.name]:
        k, want = final[name], expected.get(name, Counter())
        got = {"total": k.total_requests, "success": k.successful_requests,
               "rate_limited": k.rate_limited_requests, "failed": k.failed_requests}
        assert got == {f: want[f] for f in got}, (name, got, dict(want))
    assert VICTIM_REMOVE.name not in final and not any(e.name in final for e in EXTRAS)

    # -- removed or disabled keys leave every proxy within 1 s ------------------------------------------------------
    by_key: dict[str, list[float]] = {}
    for s in seen:
        by_key.setdefault(s.key_name or "?", []).append(s.at)
    late = []
    for command, name, at in cli_log:
        if command not in ("disable", "remove-key"):
            continue
        back = next((t for c, n, t in cli_log if n == name and c == "enable" and t > at), float("inf"))
        used = [t - at for t in by_key.get(name, []) if at + 1.0 < t < back]
        if used:
            late.append(f"{name} used {len(used)} time(s) more than 1 s after `{command}` (first at +{used[0]:.2f} s)")
    assert late == []
    # The edited keys were really in rotation before they were taken out, so the check above means something.
    disabled_at = next(t for c, n, t in cli_log if n == VICTIM_DISABLE.name)
    removed_at = next(t for c, n, t in cli_log if n == VICTIM_REMOVE.name)
    assert any(t < disabled_at for t in by_key.get(VICTIM_DISABLE.name, []))
    assert any(t < removed_at for t in by_key.get(VICTIM_REMOVE.name, []))
    assert sum(1 for e in EXTRAS if by_key.get(e.name)) >= 1  # added keys were picked up by the proxies
    print(f"outcomes: {outcomes} ({len(seen)} real upstream attempts from {requests_sent} requests, "
          f"{DRIVERS * OUTCOMES_PER_DRIVER} driven); CLI edits: {len(cli_log)}")
