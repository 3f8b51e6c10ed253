"""Issue "Stop learning limits by hitting them", through a real mitmdump against the fake Kimi: caps learned from
Kimi's 429s and then held before sending, stated caps, the fair queue and its local 429, conversation affinity with
Kimi's per-account context cache, and files that belong to the account that uploaded them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakekimi import FakeKimi
from harness import (
    KeySpec,
    ProxyProcess,
    platform_key,
    prepare_pool,
    proxy_client,
    read_keys,
    run_cli,
    stream_request,
)

from kimi_rotator.models import AccountRecord, Limit, Surface
from kimi_rotator.store_sqlite import SqliteStore

pytestmark = pytest.mark.e2e

OP_CHAT = "https://api.moonshot.ai/v1/chat/completions"
FILES = "https://api.moonshot.ai/v1/files"
BEARER = {"authorization": "Bearer placeholder"}
KEYS = [
    KeySpec(platform_key("lima"), "a1", Surface.MOONSHOT_AI, "acct-a"),
    KeySpec(platform_key("limb"), "b1", Surface.MOONSHOT_AI, "acct-b"),
]


def chat(conversation: str | None = None, stream: bool = True, turn: int = 0) -> dict[str, Any]:
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are terse."},
                                      {"role": "user", "content": f"question of {conversation or 'nobody'}"}]
    for i in range(turn):
        messages += [{"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": f"more {i}"}]
    body: dict[str, Any] = {"model": "kimi-k2.6", "messages": messages, "stream": stream}
    if conversation is not None:
        body["prompt_cache_key"] = conversation
    return body


def state_caps(home: Path, account: str, **caps: int) -> None:
    group = (Surface.MOONSHOT_AI, account)
    store = SqliteStore(home)
    try:
        store.update_account(group, lambda r: AccountRecord(surface=group[0], account=account,
                                                            stated={Limit(k): v for k, v in caps.items()}))
    finally:
        store.close()


def parallel(n: int, send: Callable[[int], Any]) -> list[Any]:
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = send(i)
        except Exception as e:  # reported in the assertion, not lost in a thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


@pytest.fixture
def slow_streams(fake_kimi: FakeKimi) -> Iterator[FakeKimi]:
    """The fake with streams of 5 events 0.15 s apart (about 0.75 s each), for the time of one test."""
    interval, fake_kimi.interval = fake_kimi.interval, 0.15
    yield fake_kimi
    fake_kimi.interval = interval


@pytest.fixture
def pool(proxy_factory: Any, fake_kimi: FakeKimi, pki: Any) -> Callable[..., tuple[ProxyProcess, Path]]:
    def start(**options: object) -> tuple[ProxyProcess, Path]:
        home = proxy_factory.home("limits")
        base = prepare_pool(fake_kimi, pki.ca_cert, home, KEYS)
        return proxy_factory(home, {**base, **options}), home
    return start


def test_caps_learned_from_429s_are_held_before_sending(pool: Any, slow_streams: FakeKimi) -> None:
    """Each account allows 2 requests in flight. The first 429 per account teaches the proxy that cap; from then on
    it never sends a third, and requests beyond 4 in flight wait in its queue instead of being refused."""
    fake_kimi = slow_streams
    for account in ("acct-a", "acct-b"):
        fake_kimi.set_limit(account, concurrency=2)
    proxy, home = pool(kimi_max_wait=10)
    with proxy_client(proxy, timeout=30) as client:
        def send(i: int) -> int:
            return stream_request(client, OP_CHAT, body=chat(f"c{i}"), headers=BEARER).status
        first = parallel(8, send)
        fake_kimi.clear_requests()
        second = parallel(8, send)  # the caps are known now
    assert first == [200] * 8 and second == [200] * 8
    assert sum(fake_kimi.account_counts(429).values()) == 0  # the second wave hit no cap
    assert fake_kimi.peak_inflight("acct-a") <= 2 and fake_kimi.peak_inflight("acct-b") <= 2
    accounts = SqliteStore(home, readonly=True).accounts()
    for account in ("acct-a", "acct-b"):
        learned = accounts[(Surface.MOONSHOT_AI, account)].learned[Limit.CONCURRENCY]
        assert learned.value == 2 and learned.source.value == "message"
    log = proxy.log_text()
    assert "queued" in log  # some requests of the second wave waited for a slot


def test_stated_caps_mean_no_429_at_all(slow_streams: FakeKimi, pki: Any, proxy_factory: Any) -> None:
    fake_kimi = slow_streams
    for account in ("acct-a", "acct-b"):
        fake_kimi.set_limit(account, concurrency=1)
    home = proxy_factory.home("stated")
    base = prepare_pool(fake_kimi, pki.ca_cert, home, KEYS)
    for account in ("acct-a", "acct-b"):
        state_caps(home, account, concurrency=1)
    proxy = proxy_factory(home, {**base, "kimi_max_wait": 10})
    with proxy_client(proxy, timeout=30) as client:
        results = parallel(6, lambda i: stream_request(client, OP_CHAT, body=chat(), headers=BEARER).status)
    assert results == [200] * 6
    assert fake_kimi.account_counts(429) == {"acct-a": 0, "acct-b": 0}
    assert fake_kimi.peak_inflight("acct-a") == 1 and fake_kimi.peak_inflight("acct-b") == 1


def test_a_full_pool_answers_a_local_429_with_an_honest_retry_after(fake_kimi: FakeKimi, proxy_factory: Any,
                                                                     pki: Any) -> None:
    home = proxy_factory.home("rpm")
    base = prepare_pool(fake_kimi, pki.ca_cert, home, KEYS)
    for account in ("acct-a", "acct-b"):
        state_caps(home, account, rpm=1)
    proxy = proxy_factory(home, {**base, "kimi_max_wait": 2})
    with proxy_client(proxy) as client:
        for _ in range(2):
            assert client.post(OP_CHAT, json=chat(stream=False), headers=BEARER).status_code == 200
        started = time.monotonic()
        refused = client.post(OP_CHAT, json=chat(stream=False), headers=BEARER)
    assert refused.status_code == 429
    assert time.monotonic() - started < 1.0  # nothing frees within kimi_max_wait: no point holding the client
    assert 55 <= int(refused.headers["retry-after"]) <= 61
    assert "at its caps" in refused.json()["error"]["message"]
    assert len(fake_kimi.requests) == 2  # the third never reached Kimi


def test_conversations_keep_their_account_and_its_context_cache(pool: Any, fake_kimi: FakeKimi) -> None:
    fake_kimi.enable_context_cache()
    proxy, _ = pool()
    cached: dict[str, list[int]] = {"c1": [], "c2": []}
    with proxy_client(proxy) as client:
        for turn in range(4):
            for conv in ("c1", "c2"):
                r = client.post(OP_CHAT, json=chat(conv, stream=False, turn=turn), headers=BEARER)
                assert r.status_code == 200
                cached[conv].append(r.json()["usage"]["cached_tokens"])
    by_conv: dict[str, set[str | None]] = {"c1": set(), "c2": set()}
    for seen in fake_kimi.requests:
        by_conv[json.loads(seen.body)["prompt_cache_key"]].add(seen.account)
    assert len(by_conv["c1"]) == 1 and len(by_conv["c2"]) == 1  # each stayed on one account
    assert by_conv["c1"] != by_conv["c2"]  # and the two were spread over the two accounts
    for conv in ("c1", "c2"):  # every request after the first found its prefix in its account's cache
        assert cached[conv][0] == 0 and all(n > 0 for n in cached[conv][1:]), cached


def test_conversation_notes_are_in_the_flow_comment(proxy_factory: Any, fake_kimi: FakeKimi, pki: Any,
                                                     tmp_path: Path) -> None:
    from mitmproxy import http, io

    home = proxy_factory.home("notes")
    base = prepare_pool(fake_kimi, pki.ca_cert, home, KEYS)
    dump = tmp_path / "flows.mitm"
    proxy = proxy_factory(home, base, dump=dump)
    with proxy_client(proxy) as client:
        for turn in range(2):
            assert client.post(OP_CHAT, json=chat("c1", stream=False, turn=turn), headers=BEARER).status_code == 200
    proxy.stop()
    with open(dump, "rb") as f:
        comments = [fl.comment for fl in io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
    assert comments[0].endswith("(new conversation)") and comments[1].endswith("(pin held)"), comments


def _upload(client: httpx.Client, content: bytes) -> str:
    r = client.post(FILES, headers=BEARER, files={"file": ("notes.txt", content, "text/plain")},
                    data={"purpose": "file-extract"})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_files_go_to_the_account_that_uploaded_them(pool: Any, fake_kimi: FakeKimi) -> None:
    fake_kimi.enable_files()
    proxy, home = pool()
    with proxy_client(proxy) as client:
        file_id = _upload(client, b"hello")
        owner = fake_kimi.file_owner(file_id)
        owner_key = next(k for k in KEYS if k.account == owner)
        other_key = next(k for k in KEYS if k.account != owner)
        # Make the other key the one health-based would pick: requests about the file must still go to the owner.
        assert run_cli(home, "use-key", other_key.name).returncode == 0
        time.sleep(0.3)
        fake_kimi.clear_requests()
        for path in (f"{FILES}/{file_id}", f"{FILES}/{file_id}/content"):
            r = client.get(path, headers=BEARER)
            assert r.status_code == 200, r.text
        assert {s.key_name for s in fake_kimi.requests} == {owner_key.name}
        # The owner's key is disabled: the request fails over, and the answer says whose file it is.
        assert run_cli(home, "disable", owner_key.name).returncode == 0
        time.sleep(0.3)
        gone = client.get(f"{FILES}/{file_id}/content", headers=BEARER)
    assert gone.status_code == 404
    message = gone.json()["error"]["message"]
    assert "belongs to another account" in message and owner_key.name in message
    assert owner_key.secret not in message
    assert read_keys(home)  # the store is intact


def test_proxies_on_one_store_split_an_accounts_caps(slow_streams: FakeKimi, pki: Any, proxy_factory: Any) -> None:
    """Two proxies on one store: each holds a share of the account's cap (here 1 of 2 in flight), so together they
    never exceed it, and nothing is refused."""
    fake_kimi = slow_streams
    keys = KEYS[:1]
    fake_kimi.set_limit("acct-a", concurrency=2)
    home = proxy_factory.home("shared")
    base = prepare_pool(fake_kimi, pki.ca_cert, home, keys)
    state_caps(home, "acct-a", concurrency=2)
    proxies = [proxy_factory(home, {**base, "kimi_max_wait": 15}) for _ in range(2)]
    deadline = time.monotonic() + 10
    while len(SqliteStore(home, readonly=True).live_proxies(time.time(), 10)) < 2:  # each has said it is alive
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(2.5)  # and has read the other's row at its next heartbeat (pool.HEARTBEAT_SECONDS apart)
    clients = [proxy_client(p, timeout=30) for p in proxies]
    try:
        results = parallel(8, lambda i: stream_request(clients[i % 2], OP_CHAT, body=chat(), headers=BEARER).status)
    finally:
        for c in clients:
            c.close()
    assert results == [200] * 8
    assert fake_kimi.account_counts(429)["acct-a"] == 0  # alone, each proxy would have sent 2: 4 at once
    assert fake_kimi.peak_inflight("acct-a") <= 2


def test_a_cap_that_shrank_is_corrected_from_the_next_429(pool: Any, slow_streams: FakeKimi) -> None:
    """The proxy learned 3 in flight; Kimi now allows 1 (another tool, a plan change). The request that hits the new
    cap fails over to the other account, and the learned cap becomes 1."""
    fake_kimi = slow_streams
    for account in ("acct-a", "acct-b"):
        fake_kimi.set_limit(account, concurrency=3)
    proxy, home = pool(kimi_max_wait=10)
    with proxy_client(proxy, timeout=30) as client:
        parallel(8, lambda i: stream_request(client, OP_CHAT, body=chat(f"c{i}"), headers=BEARER).status)
        accounts = SqliteStore(home, readonly=True).accounts()
        assert {accounts[(Surface.MOONSHOT_AI, a)].cap(Limit.CONCURRENCY) for a in ("acct-a", "acct-b")} == {3}
        assert stream_request(client, OP_CHAT, body=chat("x"), headers=BEARER).status == 200
        pinned = fake_kimi.requests[-1].account  # conversation x's account
        assert pinned is not None
        fake_kimi.set_limit(pinned, concurrency=1)
        fake_kimi.clear_requests()
        # Two requests of x at once: both go to its account, which now refuses the second.
        results = parallel(2, lambda i: stream_request(client, OP_CHAT, body=chat("x", turn=1), headers=BEARER).status)
    assert results == [200, 200]  # the refused one went to the other account
    assert fake_kimi.account_counts(429)[pinned] == 1
    group = (Surface.MOONSHOT_AI, pinned)
    deadline = time.monotonic() + 5
    while SqliteStore(home, readonly=True).accounts()[group].cap(Limit.CONCURRENCY) != 1:
        assert time.monotonic() < deadline, SqliteStore(home, readonly=True).accounts()[group]
        time.sleep(0.1)
