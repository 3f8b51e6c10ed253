"""End-to-end in one process: the addon in a real DumpMaster, driven through mitmproxy's command and option APIs.

`kimi.status` and `kimi.rotate` as a user runs them from the mitmproxy/mitmweb prompt (`master.commands.call`), and
options changed while the proxy runs, checked by the requests that follow through the listening proxy.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakekimi import FakeKimi, Reply
from harness import (
    CHAT_BODY,
    KC_CHAT,
    PLACEHOLDER,
    KeySpec,
    key_rows,
    kimi_key,
    read_keys,
    reset_store,
    upstream_options,
)
from mitmproxy import options
from mitmproxy.tools.dump import DumpMaster

from kimi_rotator.addon import KimiRotate
from kimi_rotator.failover import Reply as Reply_
from kimi_rotator.relay import Handover, Relay
from kimi_rotator.store_sqlite import SqliteStore

pytestmark = [
    pytest.mark.e2e,
    # mitmproxy's own modules (tlsconfig, passlib, ldap3) warn about their dependencies when a master is built.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ONE, TWO, THREE = kimi_key("0c01"), kimi_key("0c02"), kimi_key("0c03")
KEYS = [KeySpec(ONE, "one", account="acct-1"), KeySpec(TWO, "two", account="acct-2")]


class Guard:
    """Nothing the addon did not send to loopback may leave the machine."""

    def server_connect(self, data: Any) -> None:
        address = data.server.address
        if address is not None and address[0] not in ("127.0.0.1", "::1"):
            data.server.address = ("127.0.0.1", 9)


class FromAnotherMachine:
    """Makes every client connection look as if it came from another machine (a test cannot bind such a peer)."""

    def client_connected(self, client: Any) -> None:
        client.peername = ("192.0.2.7", client.peername[1])


class Running:
    def __init__(self, master: DumpMaster, addon: KimiRotate, port: int, ca: Path, home: Path) -> None:
        self.master, self.addon, self.port, self.ca, self.home = master, addon, port, ca, home

    def current_in_store(self) -> str | None:
        store = SqliteStore(self.home)
        try:
            active = store.settings().active_key_id
            return next((k.name for k in list(store.keys()) if k.id == active), None)
        finally:
            store.close()

    def command(self, name: str) -> Any:
        return self.master.commands.call(name)

    async def ask(self, stream: bool = False) -> httpx.Response:
        verify = ssl.create_default_context(cafile=str(self.ca))
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{self.port}", verify=verify, trust_env=False,
                                     timeout=15) as client:
            return await client.post(KC_CHAT, json={**CHAT_BODY, "stream": stream},
                                     headers={"authorization": f"Bearer {PLACEHOLDER}"})


@pytest.fixture
def fake(fake_kimi: FakeKimi) -> FakeKimi:
    for secret, name, account in ((ONE, "one", "acct-1"), (TWO, "two", "acct-2"), (THREE, "three", "acct-3")):
        fake_kimi.add_key(secret, account=account, name=name)
    return fake_kimi


@pytest.fixture
async def running(tmp_path: Path, mitm_confdir: Path, fake: FakeKimi, pki: Any) -> AsyncIterator[Running]:
    home = tmp_path / "home"
    reset_store(home, KEYS)
    opts = options.Options(listen_host="127.0.0.1", listen_port=0, confdir=str(mitm_confdir))
    master = DumpMaster(opts, with_termlog=False, with_dumper=False)
    addon = KimiRotate()
    master.addons.add(addon, Guard())
    master.options.update(kimi_home=str(home), kimi_max_wait=0, **upstream_options(fake.port, pki.ca_cert))
    task = asyncio.create_task(master.run())
    proxyserver = master.addons.get("proxyserver")
    for _ in range(500):
        if proxyserver.listen_addrs():
            break
        await asyncio.sleep(0.01)
    port = proxyserver.listen_addrs()[0][1]
    try:
        yield Running(master, addon, port, mitm_confdir / "mitmproxy-ca-cert.pem", home)
    finally:
        master.shutdown()
        await asyncio.wait_for(task, 10)


async def wait_until(predicate: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_status_shows_the_key_table(running: Running, fake: FakeKimi) -> None:
    assert (await running.ask()).status_code == 200
    text = running.command("kimi.status")
    lines = text.splitlines()
    assert lines[0] == "strategy: health-based"
    assert lines[1].startswith("● [0] one sk-kimi-…0c01 kimi-code health 100 active")
    assert lines[2].startswith("○ [1] two sk-kimi-…0c02 kimi-code health 100 active")
    assert ONE not in text and TWO not in text


async def test_rotate_serves_the_next_request_from_another_key(running: Running, fake: FakeKimi) -> None:
    assert (await running.ask()).status_code == 200
    await wait_until(lambda: running.current_in_store() == "one")  # the proxy has saved which key is current
    assert running.command("kimi.rotate") == "kimi-rotate: now using two sk-kimi-…0c02"
    await asyncio.sleep(0.5)
    assert (await running.ask()).status_code == 200
    assert [r.key_name for r in fake.requests] == ["one", "two"]
    await wait_until(lambda: running.command("kimi.status").splitlines()[2].startswith("● [1] two"))


async def test_kimi_home_can_change_while_running(running: Running, fake: FakeKimi, tmp_path: Path) -> None:
    assert (await running.ask()).status_code == 200
    other = tmp_path / "other-home"
    reset_store(other, [KeySpec(THREE, "three", account="acct-3")])
    running.master.options.update(kimi_home=str(other))
    assert (await running.ask()).status_code == 200
    assert [r.key_name for r in fake.requests] == ["one", "three"]
    await wait_until(lambda: read_keys(other)[0].total_requests == 1)  # outcomes reach the new store
    assert key_rows(other)["three"]["successful_requests"] == 1


async def test_an_internal_error_answers_502_instead_of_sending_the_request_without_a_key(
    running: Running, fake: FakeKimi, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(job: object) -> None:
        raise RuntimeError("a bug in the failover loop")

    assert running.addon.failover is not None
    monkeypatch.setattr(running.addon.failover, "run", broken)
    for stream in (False, True):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            r = await running.ask(stream=stream)
        assert r.status_code == 502
        assert "internal error" in r.json()["error"]["message"]
        assert any("a bug in the failover loop" in str(rec.exc_info) for rec in caplog.records)
    assert fake.requests == []  # nothing went to Kimi with the client's placeholder


async def test_a_client_on_another_machine_gets_a_403_in_its_envelope_until_remote_clients_are_allowed(
    running: Running, fake: FakeKimi
) -> None:
    running.master.addons.add(FromAnotherMachine())
    for stream in (False, True):
        r = await running.ask(stream=stream)
        assert r.status_code == 403 and r.headers["x-kimi-rotate"] == "local"
        error = r.json()["error"]
        assert error["type"] == "permission_denied_error", error
        assert "came from 192.0.2.7" in error["message"] and "kimi_allow_remote" in error["message"]
    assert fake.requests == []  # nothing went upstream, with a key or without
    running.master.options.update(kimi_allow_remote=True)
    assert (await running.ask()).status_code == 200
    assert [r.key_name for r in fake.requests] == ["one"]


async def test_only_an_open_event_stream_is_handed_to_the_relay(
    running: Running, fake: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer decides, not the request: a JSON answer is read whole even when the client asked to stream."""
    relay = running.addon.relay
    assert relay is not None
    handed: list[Handover] = []

    def register(handover: Handover) -> str:
        handed.append(handover)
        return Relay.register(relay, handover)

    monkeypatch.setattr(relay, "register", register)
    assert (await running.ask(stream=False)).status_code == 200
    assert handed == []
    streamed = await running.ask(stream=True)
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    assert len(handed) == 1 and b"data:" in streamed.content
    for secret in (ONE, TWO):
        fake.script(secret, [Reply.not_found()])  # passed on as it came, on whichever key is current
    refused = await running.ask(stream=True)
    assert refused.status_code == 404 and refused.headers["content-length"] == str(len(refused.content))
    assert len(handed) == 1


class Killer:
    """Kills every flow after kimi-rotate's request hook, so mitmproxy never comes for the answer handed over."""

    def request(self, flow: Any) -> None:
        flow.kill()


async def test_an_answer_handed_over_but_never_collected_is_closed_in_the_error_hook(
    running: Running, fake: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert running.addon.failover is not None and running.addon.relay is not None
    replies: list[Reply_] = []
    closed: list[Reply_] = []
    run = running.addon.failover.run

    async def recording(job: Any) -> Reply_:
        reply = await run(job)
        close = reply.aclose

        async def aclose() -> None:
            closed.append(reply)
            await close()

        reply.aclose = aclose  # type: ignore[method-assign]
        replies.append(reply)
        return reply

    monkeypatch.setattr(running.addon.failover, "run", recording)
    running.master.addons.add(Killer())
    with pytest.raises(httpx.HTTPError):
        await running.ask(stream=True)
    await wait_until(lambda: closed == replies and len(replies) == 1)  # at once, not after the relay's 30 s
    assert running.addon.relayed == {} and running.addon.relay._waiting == {}
