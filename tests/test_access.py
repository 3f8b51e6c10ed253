"""Who gets a key: the addon's request hook with flows from clients on other machines (mitmproxy.test flows), and
the decision's parts. tests/test_e2e_commands.py sends such a request through a listening proxy."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.addons import proxyauth
from mitmproxy.proxy import mode_specs
from mitmproxy.test import taddons, tflow, tutils

from kimi_rotator.access import KeyAccess, is_loopback, key_access
from kimi_rotator.addon import KimiRotate
from kimi_rotator.envelopes import LOCAL_HEADER
from kimi_rotator.failover import Job, Reply
from kimi_rotator.models import Surface
from kimi_rotator.proxy import ProxyConfig, ProxyError, build_master, check_exposure
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore

KEY = "sk-kimi-" + "a" * 40
TOKEN = "let-me-in"
CHAT, MESSAGES = "/coding/v1/chat/completions", "/coding/v1/messages"
REMOTE_PEERS = [("192.0.2.7", 50000), ("10.0.0.2", 1), ("2001:db8::7", 50000, 0, 0), ("::ffff:192.0.2.7", 2),
                ("0.0.0.0", 3)]
LOCAL_PEERS = [("127.0.0.1", 50000), ("127.8.9.10", 1), ("::1", 50000, 0, 0), ("::ffff:127.0.0.1", 2)]
SERVED = 418  # what the stand-in failover answers: the request was let through to a key


@pytest.mark.parametrize("host", ["127.0.0.1", "127.255.0.1", "::1", "::ffff:127.0.0.1", "::ffff:127.1.2.3",
                                  "localhost", "::1%lo"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.2", "10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1",
                                  "fe80::1%eth0", "", "example.com", "localhost.example.com", "128.0.0.1"])
def test_other_addresses(host: str) -> None:
    assert not is_loopback(host)


def test_what_vouches_for_remote_clients() -> None:
    assert key_access("", None, False) is KeyAccess.LOOPBACK
    assert key_access("", "", False) is KeyAccess.LOOPBACK
    assert key_access("", "any", False) is KeyAccess.LOOPBACK  # accepts every user and password
    assert key_access("", "user:pass", False) is KeyAccess.PROXY_AUTH
    assert key_access("", "@/etc/htpasswd", False) is KeyAccess.PROXY_AUTH
    assert key_access(TOKEN, None, False) is KeyAccess.TOKEN
    assert key_access(TOKEN, "user:pass", True) is KeyAccess.TOKEN
    assert key_access("", None, True) is KeyAccess.ANYONE
    assert key_access("", "any", True) is KeyAccess.ANYONE


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.2"])
def test_kimi_rotate_proxy_refuses_an_open_listener_with_nothing_that_vouches_for_clients(host: str) -> None:
    with pytest.raises(ProxyError, match=f"refusing to listen on {re.escape(host)} without protection"):
        check_exposure(host, KeyAccess.LOOPBACK)
    for access in (KeyAccess.TOKEN, KeyAccess.PROXY_AUTH, KeyAccess.ANYONE):
        check_exposure(host, access)
    check_exposure("127.0.0.1", KeyAccess.LOOPBACK)
    check_exposure("::1", KeyAccess.LOOPBACK)


async def test_allow_remote_is_the_addons_option(kimi_home: Path, tmp_path: Path) -> None:
    sets = [f"confdir={tmp_path / 'conf'}"]
    m = build_master(ProxyConfig(host="0.0.0.0", port=0, sets=sets, allow_remote=True), asyncio.get_running_loop())
    addon = next(a for a in m.addons.chain if isinstance(a, KimiRotate))
    assert m.options.kimi_allow_remote is True and addon.access is KeyAccess.ANYONE
    addon.done()
    with pytest.raises(ProxyError, match=r"refusing to listen on 0\.0\.0\.0"):
        build_master(ProxyConfig(host="0.0.0.0", port=0, sets=sets), asyncio.get_running_loop())


class Proxy:
    def __init__(self, ctx: taddons.context, addon: KimiRotate) -> None:
        self.ctx, self.addon = ctx, addon
        self.jobs: list[Job] = []

        async def run(job: Job) -> Reply:  # stands in for the failover loop: no upstream in these tests
            self.jobs.append(job)
            return Reply(status=SERVED, message="served")

        assert addon.failover is not None
        addon.failover.run = run  # type: ignore[method-assign]

    def set(self, **options: object) -> None:
        self.ctx.options.update(**options)

    async def send(self, peer: tuple[object, ...], path: str = CHAT, credential: str = "placeholder",
                   replay: bool = False, mode: str = "regular") -> http.HTTPFlow:
        flow = tflow.tflow(req=tutils.treq(scheme=b"https", host="api.kimi.com", port=443, path=path.encode(),
                                           headers=http.Headers(authorization=f"Bearer {credential}")))
        flow.client_conn.peername = peer  # type: ignore[assignment]
        flow.client_conn.sni = "api.kimi.com"
        flow.client_conn.proxy_mode = mode_specs.ProxyMode.parse(mode)
        if replay:
            flow.is_replay = "request"
        await self.addon.request(flow)
        return flow


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    home = tmp_path / "home"
    store = SqliteStore(home)
    store.add_key(NewKey(secret=KEY, name="one", surface=Surface.KIMI_CODE), time.time())
    store.close()
    addon = KimiRotate()
    with taddons.context(proxyauth.ProxyAuth(), addon) as ctx:
        ctx.options.update(kimi_home=str(home))
        yield Proxy(ctx, addon)
        addon.done()


def assert_refused(flow: http.HTTPFlow, peer: str) -> None:
    assert flow.response is not None and flow.response.status_code == 403
    assert flow.response.headers[LOCAL_HEADER] == "local"
    error = json.loads(flow.response.content or b"")["error"]
    assert peer in error["message"] and "kimi_client_token" in error["message"]
    assert "kimi_allow_remote" in error["message"] and "proxyauth" in error["message"]
    assert flow.request.headers["authorization"] == "Bearer placeholder"  # no key was put on it


@pytest.mark.parametrize("peer", REMOTE_PEERS, ids=lambda p: str(p[0]))
async def test_a_client_on_another_machine_gets_a_local_403(proxy: Proxy, peer: tuple[object, ...]) -> None:
    flow = await proxy.send(peer)
    assert_refused(flow, str(peer[0]))
    assert json.loads(flow.response.content or b"")["error"]["type"] == "permission_denied_error"  # type: ignore
    assert proxy.jobs == []


async def test_the_403_comes_in_the_anthropic_envelope_on_messages(proxy: Proxy) -> None:
    flow = await proxy.send(REMOTE_PEERS[0], path=MESSAGES)
    assert_refused(flow, "192.0.2.7")
    doc = json.loads(flow.response.content or b"")  # type: ignore[union-attr]
    assert doc["type"] == "error" and doc["error"]["type"] == "permission_error"
    assert proxy.jobs == []


@pytest.mark.parametrize("peer", LOCAL_PEERS, ids=lambda p: str(p[0]))
async def test_a_client_on_this_machine_gets_a_key(proxy: Proxy, peer: tuple[object, ...]) -> None:
    flow = await proxy.send(peer)
    assert flow.response is not None and flow.response.status_code == SERVED
    assert len(proxy.jobs) == 1


async def test_local_mode_clients_are_programs_on_this_machine(proxy: Proxy) -> None:
    flow = await proxy.send(REMOTE_PEERS[0], mode="local")  # they connect with the machine's own address
    assert flow.response is not None and flow.response.status_code == SERVED


async def test_a_replay_is_the_users_own_doing(proxy: Proxy) -> None:
    flow = await proxy.send(REMOTE_PEERS[0], replay=True)
    assert flow.response is not None and flow.response.status_code == SERVED


async def test_with_a_client_token_any_client_that_sends_it_gets_a_key(proxy: Proxy) -> None:
    proxy.set(kimi_client_token=TOKEN)
    served = await proxy.send(REMOTE_PEERS[0], credential=TOKEN)
    assert served.response is not None and served.response.status_code == SERVED
    untouched = await proxy.send(REMOTE_PEERS[0])  # passes as it came, as it always did with a token
    assert untouched.response is None and untouched.request.headers["authorization"] == "Bearer placeholder"
    assert len(proxy.jobs) == 1


async def test_with_proxy_authentication_remote_clients_get_a_key(proxy: Proxy) -> None:
    proxy.set(proxyauth="user:pass")  # mitmproxy answers 407 to the others before this hook runs
    flow = await proxy.send(REMOTE_PEERS[0])
    assert flow.response is not None and flow.response.status_code == SERVED


async def test_proxyauth_any_vouches_for_no_one(proxy: Proxy) -> None:
    proxy.set(proxyauth="any")
    assert_refused(await proxy.send(REMOTE_PEERS[0]), "192.0.2.7")


async def test_kimi_allow_remote_serves_everyone_and_can_be_turned_off_again(proxy: Proxy) -> None:
    proxy.set(kimi_allow_remote=True)
    flow = await proxy.send(REMOTE_PEERS[0])
    assert flow.response is not None and flow.response.status_code == SERVED
    proxy.set(kimi_allow_remote=False)
    assert_refused(await proxy.send(REMOTE_PEERS[0]), "192.0.2.7")


def test_the_decision_is_logged_at_start_and_again_only_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    addon = KimiRotate()
    with caplog.at_level(logging.INFO, logger="kimi_rotate"), taddons.context(proxyauth.ProxyAuth(), addon) as ctx:
        ctx.options.update(kimi_home=str(tmp_path / "home"))
        ctx.options.update(kimi_max_wait=1)
        ctx.options.update(kimi_allow_remote=True)
        ctx.options.update(proxyauth="user:pass")
        addon.done()
    said = [r.getMessage() for r in caplog.records if "keys go" in r.getMessage()]
    assert said == [f"kimi-rotate: {KeyAccess.LOOPBACK.value}", f"kimi-rotate: {KeyAccess.ANYONE.value}",
                    f"kimi-rotate: {KeyAccess.PROXY_AUTH.value}"]
    assert "only to clients on this machine" in said[0] and "kimi_allow_remote" in said[0]
    warned = [r for r in caplog.records if r.getMessage() == said[1]]
    assert warned[0].levelno == logging.WARNING
