"""End-to-end: the addon's own client follows mitmproxy's upstream settings, and nothing else.

- `--mode upstream:http://…` with `upstream_auth`: Kimi requests go through that proxy's CONNECT tunnel, with its
  credentials, streaming and not (a corporate proxy must see them as it sees mitmproxy's own traffic).
- `ssl_insecure`: an upstream certificate that no trusted CA signed is accepted, as mitmproxy would.
- An HTTPS_PROXY inherited by the proxy process (often the proxy itself) is never used.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakekimi import FakeKimi
from harness import (
    CHAT_BODY,
    KC_CHAT,
    PLACEHOLDER,
    KeySpec,
    curl,
    kimi_key,
    reset_store,
    upstream_options,
)

pytestmark = pytest.mark.e2e

KEY = kimi_key("0s01")
IO_TIMEOUT = 10.0


class ConnectProxy:
    """A plain CONNECT proxy on loopback that sends every tunnel to one address and records what it was asked."""

    def __init__(self, target: tuple[str, int], answer: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n"):
        self.target = target
        self.answer = answer
        self.heads: list[bytes] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        client.settimeout(IO_TIMEOUT)
        with client:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = client.recv(4096)
                if not data:
                    return
                head += data
            self.heads.append(head.split(b"\r\n\r\n", 1)[0])
            client.sendall(self.answer)
            if not self.answer.startswith(b"HTTP/1.1 200"):
                return
            with socket.create_connection(self.target, IO_TIMEOUT) as upstream:
                pump = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
                pump.start()
                _pipe(client, upstream)
                pump.join(IO_TIMEOUT)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, fake_kimi_server: FakeKimi) -> Path:
    fake_kimi_server.add_key(KEY, account="acct-1", name="one")
    path = tmp_path_factory.mktemp("upstream-settings") / "home"
    reset_store(path, [KeySpec(KEY, "one", account="acct-1")])
    return path


@pytest.fixture
def connect_proxy(fake_kimi_server: FakeKimi) -> Iterator[ConnectProxy]:
    with ConnectProxy(("127.0.0.1", fake_kimi_server.port)) as proxy:
        yield proxy


def ask(proxy: Any, stream: bool) -> tuple[int, str]:
    body = {**CHAT_BODY, "stream": True} if stream else CHAT_BODY
    r = curl(proxy, KC_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=body, timeout=15)
    return r.status, r.body.decode("utf-8", "replace")


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_upstream_mode_tunnels_kimi_requests_through_the_upstream_proxy(
    proxy_factory: Any, fake_kimi: FakeKimi, connect_proxy: ConnectProxy, pki: Any, home: Path, stream: bool
) -> None:
    proxy = proxy_factory(home, {
        "mode": f"upstream:http://127.0.0.1:{connect_proxy.port}",
        "upstream_auth": "corp-user:corp-pass",
        "ssl_verify_upstream_trusted_ca": str(pki.ca_cert),
    })
    status, text = ask(proxy, stream)
    assert status == 200, text
    assert ("ok one #5" if stream else '"ok one"') in text
    assert [r.key_name for r in fake_kimi.requests] == ["one"]
    # One tunnel: the addon's. mitmproxy opens none of its own (no idle eager connection, and the relay is reached
    # directly, not through the upstream proxy).
    assert len(connect_proxy.heads) == 1, connect_proxy.heads
    for head in connect_proxy.heads:
        assert head.startswith(b"CONNECT api.kimi.com:443 HTTP/1.1\r\n"), head
        assert b"\r\nproxy-authorization: basic y29ycc11c2vyomnvcnatcgfzcw==" in head.lower(), head


def test_upstream_proxy_refusing_the_tunnel_gives_a_502_in_the_envelope(
    proxy_factory: Any, fake_kimi_server: FakeKimi, pki: Any, home: Path
) -> None:
    refusal = b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n"
    with ConnectProxy(("127.0.0.1", fake_kimi_server.port), answer=refusal) as refusing:
        proxy = proxy_factory(home, {"mode": f"upstream:http://127.0.0.1:{refusing.port}",
                                     "ssl_verify_upstream_trusted_ca": str(pki.ca_cert), "kimi_max_wait": 0})
        r = curl(proxy, KC_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY, timeout=15)
    assert r.status == 502, r.body[:300]
    message = r.json()["error"]["message"]
    assert "upstream proxy refused" in message and "407" in message, message


def test_ssl_insecure_accepts_an_untrusted_upstream_certificate(
    proxy_factory: Any, fake_kimi: FakeKimi, home: Path
) -> None:
    options = upstream_options(fake_kimi.port, Path("unused"))
    del options["ssl_verify_upstream_trusted_ca"]  # the fake's test CA is trusted by nothing now
    proxy = proxy_factory(home, {**options, "ssl_insecure": True})
    status, text = ask(proxy, stream=False)
    assert status == 200 and '"ok one"' in text, text


def test_an_inherited_https_proxy_is_never_used(
    proxy_factory: Any, fake_kimi: FakeKimi, pki: Any, home: Path
) -> None:
    trap = socket.create_server(("127.0.0.1", 0))
    trap.settimeout(0.5)
    trap_url = f"http://127.0.0.1:{trap.getsockname()[1]}"
    with trap:
        env = {name: trap_url for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")}
        proxy = proxy_factory(home, upstream_options(fake_kimi.port, pki.ca_cert), env=env)
        for stream in (False, True):
            status, text = ask(proxy, stream)
            assert status == 200, text
        with pytest.raises(TimeoutError):
            trap.accept()  # nothing ever connected to the inherited proxy
