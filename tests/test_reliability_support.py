"""Helpers shared by the reliability, hostile-input and secret-audit tests, and by benchmarks/soak.py.

No tests live here. What is here:
- `run_load`: N concurrent streaming clients (asyncio + httpx, one connection each) against a running proxy, with
  every answer checked (complete, in order, right envelope) and every 429 a client saw kept for the caller to judge;
- `rss_kb`: a process's resident memory from /proc;
- `secret_forms` / `find_secrets`: every spelling of a key worth searching for in bytes (raw, base64 in its three
  alignments, standard and URL-safe, percent-encoded) and a scanner that reports where a key was found;
- `WrappedProxy`: a `harness.ProxyProcess` whose command runs behind a prefix (unshare, setpriv), for the broken-store
  tests that need a private mount namespace or another user.

Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import ProxyProcess

# -- processes -------------------------------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """VmRSS of a live process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


class WrappedProxy(ProxyProcess):
    """A ProxyProcess whose mitmdump command runs behind `prefix` (e.g. `unshare -m sh -c '...; exec "$@"' sh`), with
    extra `-s` scripts and mitmdump arguments.

    The prefix must end by exec-ing the command, so that the process the harness waits for and signals is mitmdump.
    """

    def __init__(self, *args: Any, prefix: Sequence[str] = (), scripts: Sequence[Path] = (),
                 extra_args: Sequence[str] = (), **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.prefix = list(prefix)
        self.scripts = list(scripts)
        self.extra_args = list(extra_args)

    def command(self) -> list[str]:
        cmd = super().command()
        for script in self.scripts:
            cmd += ["-s", str(script)]
        return [*self.prefix, *cmd, *self.extra_args]


# -- secrets ---------------------------------------------------------------------------------------------------------


def secret_forms(secret: str) -> dict[str, bytes]:
    """Byte strings whose presence anywhere means the secret leaked, by the spelling that found it.

    Base64 of a secret embedded in a longer text depends on its offset modulo 3; for each offset the characters that
    encode only the secret's own bytes are searched (the first and last partial groups are dropped).
    """
    raw = secret.encode()
    forms: dict[str, bytes] = {"raw": raw, "percent": urllib.parse.quote(secret, safe="").encode()}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw + b"\0\0\0")
        # Characters 0..ceil(offset*4/3) mix in the padding bytes; the tail mixes in the trailing zeros.
        start = -(-offset * 4 // 3) + (1 if offset else 0)
        end = ((offset + len(raw)) * 4) // 3 - 1
        core = encoded[start:end]
        forms[f"base64@{offset}"] = core
        forms[f"base64url@{offset}"] = core.replace(b"+", b"-").replace(b"/", b"_")
    forms["hex"] = raw.hex().encode()
    return forms


def find_secrets(data: bytes, secrets: Iterable[str], where: str, partial: int = 0) -> list[str]:
    """'where: spelling of key …tail' for every secret found in `data` (never the secret itself).

    With `partial` > 0, any `partial` consecutive characters of a key's private part (after `sk-kimi-` / `sk-`) count
    too: a log line cut off after half a key leaks half a key. Only meaningful for random-looking test keys.
    """
    hits = []
    for secret in secrets:
        for form, needle in secret_forms(secret).items():
            if needle and needle in data:
                hits.append(f"{where}: {form} of key …{secret[-4:]}")
        if partial:
            private = secret.removeprefix("sk-kimi-").removeprefix("sk-").encode()
            for i in range(len(private) - partial + 1):
                if private[i : i + partial] in data:
                    hits.append(f"{where}: {partial} characters of key …{secret[-4:]} from position {i}")
                    break
    return hits


# -- load ------------------------------------------------------------------------------------------------------------

LOAD_ROUTES = (
    ("https://api.kimi.com/coding/v1/chat/completions", "openai",
     {"model": "kimi-for-coding", "messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ("https://api.kimi.com/coding/v1/messages", "anthropic",
     {"model": "kimi-for-coding", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], "stream": True}),
)
ID_HEADER = "x-load-id"


@dataclass
class Seen429:
    """A 429 that reached a client: when, for which request, and whether the proxy answered it itself."""

    load_id: str
    sent: float  # time.monotonic() when the request went out
    received: float
    local: bool
    retry_after: str | None
    message: str


@dataclass
class LoadResult:
    seconds: float
    clients: int
    requests: int = 0  # every HTTP request a client sent (retries after a 429 included)
    streams_ok: int = 0  # complete, in-order streams
    client_429s: list[Seen429] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rss_kb: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, VmRSS)
    first_event_ms: list[float] = field(default_factory=list)
    first_done: dict[int, float] = field(default_factory=dict)  # client -> seconds from start to its first stream
    wall: float = 0.0

    @property
    def warm_at(self) -> float:
        """End of warm-up: 40% of the run (at least 3 s), when every connection and buffer of the steady state
        exists; memory is judged from there to the end."""
        return max(3.0, 0.4 * self.seconds)

    def rss_at(self, t: float) -> int:
        """The first RSS sample taken at or after `t` seconds (the last one if none)."""
        for at, kb in self.rss_kb:
            if at >= t:
                return kb
        return self.rss_kb[-1][1] if self.rss_kb else 0


def _check_stream(fmt: str, body: bytes, events: int) -> str | None:
    """None if `body` is one complete, in-order stream of `events` content events from one key; else what is wrong."""
    datas: list[str] = []
    names: list[str] = []
    for block in body.decode("utf-8", "replace").replace("\r\n", "\n").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data:"):
                datas.append(line[5:].strip())
    if not datas:
        return "no events"
    texts = []
    for d in datas:
        if d == "[DONE]":
            continue
        obj = json.loads(d)
        if fmt == "anthropic" and obj.get("type") == "content_block_delta":
            texts.append(obj["delta"]["text"])
        elif fmt == "openai":
            texts += [c["delta"].get("content") for c in obj.get("choices", []) if c.get("delta", {}).get("content")]
    if not texts:
        return "no content events"
    names = [t.split()[1] for t in texts]
    name = names[0]
    expected = [f"ok {name} #{i}\n" for i in range(1, events + 1)]
    if texts != expected:
        return f"content out of order or incomplete: {[t.strip() for t in texts]}"
    last = datas[-1]
    if fmt == "openai" and last != "[DONE]":
        return "no [DONE] at the end"
    if fmt == "anthropic" and json.loads(last).get("type") != "message_stop":
        return "no message_stop at the end"
    return None


async def _client(
    n: int, proxy_url: str, ca: ssl.SSLContext, t0: float, deadline: float, result: LoadResult, events: int,
    interval: float, max_retries: int,
) -> None:
    headers = {"authorization": "Bearer sk-placeholder-from-client", "x-fake-events": str(events),
               "x-fake-interval": str(interval)}
    seq = 0
    async with httpx.AsyncClient(proxy=proxy_url, verify=ca, trust_env=False, timeout=30.0) as client:
        while time.monotonic() < deadline:
            url, fmt, body = LOAD_ROUTES[(n + seq) % len(LOAD_ROUTES)]
            seq += 1
            for attempt in range(max_retries + 1):
                load_id = f"c{n}-{seq}-{attempt}"
                sent = time.monotonic()
                try:
                    async with client.stream("POST", url, json=body, headers={**headers, ID_HEADER: load_id}) as r:
                        chunks = []
                        first: float | None = None
                        async for chunk in r.aiter_raw():
                            if first is None:
                                first = time.monotonic()
                            chunks.append(chunk)
                        raw = b"".join(chunks)
                except (httpx.HTTPError, OSError) as e:
                    result.requests += 1
                    result.errors.append(f"{load_id}: {type(e).__name__}: {e}")
                    break
                result.requests += 1
                if r.status_code == 429:
                    try:
                        message = str(json.loads(raw)["error"]["message"])
                    except (ValueError, KeyError, TypeError):
                        message = raw[:200].decode("utf-8", "replace")
                    result.client_429s.append(Seen429(load_id, sent, time.monotonic(), "x-kimi-rotate" in r.headers,
                                                      r.headers.get("retry-after"), message))
                    wait = min(2.0, float(r.headers.get("retry-after") or 1))
                    await asyncio.sleep(wait)
                    continue
                if r.status_code != 200:
                    result.errors.append(f"{load_id}: status {r.status_code}: {raw[:200]!r}")
                    break
                problem = _check_stream(fmt, raw, events)
                if problem:
                    result.errors.append(f"{load_id}: {problem}")
                else:
                    result.streams_ok += 1
                    result.first_done.setdefault(n, time.monotonic() - t0)
                    if first is not None:
                        result.first_event_ms.append((first - sent) * 1000)
                break
            else:
                result.errors.append(f"c{n}-{seq}: still 429 after {max_retries} retries")


async def _sample_rss(pid: int, t0: float, until: float, result: LoadResult, every: float) -> None:
    while time.monotonic() < until:
        result.rss_kb.append((time.monotonic() - t0, rss_kb(pid)))
        await asyncio.sleep(every)


def run_load(
    proxy: ProxyProcess, *, clients: int = 64, seconds: float = 10.0, events: int = 5, interval: float = 0.2,
    max_retries: int = 5, rss_every: float = 0.5,
) -> LoadResult:
    """`clients` concurrent streaming clients for `seconds`, alternating the OpenAI and Anthropic routes of Kimi Code.

    Each client keeps one connection and sends its next request when the last one ended. A 429 is recorded and retried
    after its Retry-After (at most 2 s, at most `max_retries` times), as the SDKs do. Bounded: no request is started
    after `seconds`, and each has a 30 s timeout.
    """
    assert proxy.proc is not None
    ca = ssl.create_default_context(cafile=str(proxy.ca))
    result = LoadResult(seconds, clients)

    async def main() -> None:
        t0 = time.monotonic()
        deadline = t0 + seconds
        sampler = asyncio.create_task(_sample_rss(proxy.proc.pid, t0, deadline + 60, result, rss_every))
        try:
            await asyncio.wait_for(
                asyncio.gather(*(_client(i, proxy.url, ca, t0, deadline, result, events, interval, max_retries)
                                 for i in range(clients))),
                timeout=seconds + 90,
            )
        finally:
            sampler.cancel()
            result.rss_kb.append((time.monotonic() - t0, rss_kb(proxy.proc.pid)))
            result.wall = time.monotonic() - t0

    asyncio.run(main())
    return result
