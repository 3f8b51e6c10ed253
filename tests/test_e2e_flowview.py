"""End-to-end: mitmproxy as a debugging tool for Kimi requests.

Each failed attempt of a failed-over request is a flow of its own in `-w` files and in mitmweb, next to the flow the
client got and linked by their comments: the attempt's status, headers and a bounded error body, the placeholder of
its key and never the key. A streamed answer keeps a copy of its body once it has ended; a flow passed through because
its surface has no key says so in its comment.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakekimi import FakeKimi, Reply
from harness import (
    BIN,
    CHAT_BODY,
    KC_CHAT,
    KC_MESSAGES,
    MESSAGES_BODY,
    OP_AI_CHAT,
    PLACEHOLDER,
    KeySpec,
    ProxyProcess,
    curl,
    kimi_key,
    proxy_client,
    reset_store,
    stream_request,
    upstream_options,
)
from mitmproxy import http, io
from mitmproxy import version as mitmproxy_version

from kimi_rotator.failover import ATTEMPT_BODY_LIMIT
from kimi_rotator.keys import fingerprint
from kimi_rotator.routing import placeholder

pytestmark = pytest.mark.e2e

ONE, TWO, THREE = kimi_key("0w01"), kimi_key("0w02"), kimi_key("0w03")
KEYS = [KeySpec(ONE, "one", account="acct-1"), KeySpec(TWO, "two", account="acct-2"),
        KeySpec(THREE, "three", account="acct-3")]
MASKS = {spec.name: f"sk-kimi-…{spec.secret[-4:]}" for spec in KEYS}
BIG_MESSAGE = "x" * (ATTEMPT_BODY_LIMIT + 5000)  # an error body longer than an attempt flow keeps


def leaked(data: bytes) -> list[str]:
    return [s.name for s in KEYS if s.secret.encode() in data or s.secret.split("-", 2)[-1].encode() in data]


def by_comment(flows: list[http.HTTPFlow], pattern: str) -> list[http.HTTPFlow]:
    return [f for f in flows if re.search(pattern, f.comment)]


def prepare(fake: FakeKimi, home: Path) -> None:
    for spec in KEYS:
        fake.add_key(spec.secret, account=spec.account or "none", name=spec.name)
    reset_store(home, KEYS)
    fake.reset()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, module_proxy_factory: Any, fake_kimi_server: FakeKimi, pki: Any
          ) -> Iterator[dict[str, Any]]:
    """Failovers (buffered, streamed, with a long error body, after a dropped connection), a plain stream and a
    request without a key for its surface, through `mitmdump -w`; yields the saved flows and what the clients got."""
    fake = fake_kimi_server
    root = tmp_path_factory.mktemp("flowview")
    home, dump = root / "home", root / "flows.mitm"
    prepare(fake, home)
    options = {**upstream_options(fake.port, pki.ca_cert), "kimi_max_wait": 0, "kimi_affinity": False}
    proxy = module_proxy_factory(home, options, dump=dump)
    bearer = {"authorization": f"Bearer {PLACEHOLDER}"}
    got: dict[str, Any] = {}
    fake.script(ONE, [Reply.rate_limit(retry_after=60)])
    got["buffered"] = curl(proxy, KC_CHAT, headers=bearer, body=CHAT_BODY).status  # one: 429 → two: 200
    fake.script(TWO, [Reply.server_error(message=BIG_MESSAGE)])
    with proxy_client(proxy) as client:
        streamed = stream_request(client, KC_MESSAGES, body={**MESSAGES_BODY, "stream": True},
                                  headers={"x-api-key": PLACEHOLDER})  # two: 500 (long body) → three: 200
        got["streamed"], got["streamed_body"] = streamed.status, streamed.body
    fake.fault(THREE, "close_before_headers", times=2)  # twice: a reused connection closed unanswered is retried
    got["dropped"] = curl(proxy, KC_CHAT, headers=bearer, body=CHAT_BODY).status  # three: no answer → one: 200
    got["no_key"] = curl(proxy, OP_AI_CHAT, headers=bearer, body=CHAT_BODY).status  # no moonshot-ai key
    time.sleep(0.3)  # attempt flows are added just after the client's flow
    proxy.stop()
    with open(dump, "rb") as f:
        flows = [fl for fl in io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
    yield {"flows": flows, "dump": dump, "got": got}


def test_each_failed_attempt_is_saved_as_a_flow_linked_to_the_clients(saved: dict[str, Any]) -> None:
    assert {k: v for k, v in saved["got"].items() if k != "streamed_body"} == \
        {"buffered": 200, "streamed": 200, "dropped": 200, "no_key": saved["got"]["no_key"]}
    flows = saved["flows"]
    [client] = by_comment(flows, rf"^one {MASKS['one']}: 429 .* → two {MASKS['two']}: 200")
    short = client.id[:8]
    assert client.comment.endswith(f" | flow {short}: its failed attempt is a flow of its own"), client.comment
    [attempt] = by_comment(flows, f"^attempt 1 of 2 for flow {short}: ")
    assert re.fullmatch(rf"attempt 1 of 2 for flow {short}: one {MASKS['one']}: 429 rate_limit_reached_error, "
                        r"account cooling (59|60) s", attempt.comment), attempt.comment
    assert attempt.response is not None and attempt.response.status_code == 429
    assert attempt.response.headers["retry-after"] == "60"  # Kimi's headers, as they came
    assert json.loads(attempt.response.content or b"")["error"]["type"] == "rate_limit_reached_error"
    assert attempt.request.headers["authorization"] == f"Bearer {placeholder(fingerprint(ONE))}"
    assert client.request.headers["authorization"] == f"Bearer {placeholder(fingerprint(TWO))}"
    assert (attempt.request.pretty_url, attempt.request.content) == (client.request.pretty_url, client.request.content)
    assert client.response is not None and client.response.status_code == 200
    assert not attempt.marked and client.marked


def test_a_long_error_body_is_cut_and_a_lost_connection_is_an_error(saved: dict[str, Any]) -> None:
    flows = saved["flows"]
    [long] = by_comment(flows, rf"^attempt 1 of 2 for flow \w+: two {MASKS['two']}: 500 ")
    assert long.comment.endswith("(body cut at 64 KiB)"), long.comment
    assert long.response is not None and long.response.status_code == 500
    body = long.response.raw_content or b""
    assert len(body) == ATTEMPT_BODY_LIMIT and body.startswith(b'{"type": "error", "error": {"type": "server_error"')
    assert int(long.response.headers["content-length"]) > ATTEMPT_BODY_LIMIT  # the headers still say what Kimi sent
    [dropped] = by_comment(flows, rf"^attempt 1 of 2 for flow \w+: three {MASKS['three']}: ")
    assert dropped.response is None and dropped.error is not None
    assert "could not reach Kimi" in dropped.error.msg
    assert dropped.request.headers["authorization"] == f"Bearer {placeholder(fingerprint(THREE))}"


def test_a_streamed_answer_is_saved_whole(saved: dict[str, Any]) -> None:
    [client] = by_comment(saved["flows"], rf"^two {MASKS['two']}: 500.* → three {MASKS['three']}: 200")
    assert client.response is not None and client.response.status_code == 200
    body = saved["got"]["streamed_body"]
    assert b"event: message_stop" in body
    assert client.response.raw_content == body  # what the client got, not "content missing"
    assert "stream copy cut" not in client.comment


def test_a_flow_without_a_key_for_its_surface_says_so(saved: dict[str, Any]) -> None:
    [flow] = [f for f in saved["flows"] if f.request.pretty_host == "api.moonshot.ai"]
    assert flow.comment == ("kimi-rotate: no moonshot-ai key in the pool; passed through unchanged "
                            "(kimi-rotate add-key --surface moonshot-ai)")


def test_no_key_in_the_saved_attempts(saved: dict[str, Any]) -> None:
    assert len(by_comment(saved["flows"], "^attempt ")) == 3
    assert leaked(saved["dump"].read_bytes()) == []


# -- mitmweb ---------------------------------------------------------------------------------------------------------

_PROXY_LISTENING = re.compile(r"HTTP\(S\) proxy listening at \[?[0-9a-fA-F.:*]+?\]?:(\d+)")


class WebProxy(ProxyProcess):
    """`mitmweb -s kimi_rotate.py` with no browser, on its own web port (the harness's mitmdump, otherwise)."""

    def __init__(self, *args: Any, web_port: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.web_port = web_port

    def command(self) -> list[str]:
        cmd = super().command()
        return [str(BIN / "mitmweb"), *cmd[1:], "--set", "web_open_browser=false", "--set", f"web_port={self.web_port}"]

    def start(self) -> WebProxy:
        super().start()  # the first "listening at" may be the web server's: find the proxy's own
        deadline = time.monotonic() + 20
        while not (found := _PROXY_LISTENING.search(self.log_text())):
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.05)
        self.port = int(found.group(1))
        return self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_mitmweb_lists_the_attempt_flow_with_its_comment(tmp_path: Path, fake_kimi: FakeKimi, pki: Any,
                                                         mitm_confdir: Path) -> None:
    home = tmp_path / "home"
    prepare(fake_kimi, home)
    sets: dict[str, object] = {**upstream_options(fake_kimi.port, pki.ca_cert), "kimi_max_wait": 0,
                               "kimi_affinity": False,
                               "web_columns": ["tls", "icon", "path", "method", "status", "size", "time", "comment"]}
    auth: dict[str, str] = {}
    if int(mitmproxy_version.VERSION.split(".")[0]) >= 12:  # mitmweb 12 asks for a password (a token by default)
        sets["web_password"] = "web-test-password"
        auth = {"Authorization": "Bearer web-test-password"}
    proxy = WebProxy(tmp_path / "web", home, sets, confdir=mitm_confdir, web_port=_free_port())
    try:
        proxy.start()
        fake_kimi.script(ONE, [Reply.rate_limit(retry_after=60)])
        assert curl(proxy, KC_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY).status == 200
        deadline = time.monotonic() + 5
        while True:
            request = urllib.request.Request(f"http://127.0.0.1:{proxy.web_port}/flows", headers=auth)
            with urllib.request.urlopen(request, timeout=10) as answer:
                flows = json.load(answer)
            attempts = [f for f in flows if f["comment"].startswith("attempt 1 of 2 for flow ")]
            if attempts or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        proxy.stop()
    [client] = [f for f in flows if f["comment"].startswith(f"one {MASKS['one']}: 429")]
    [attempt] = attempts
    assert attempt["comment"].startswith(f"attempt 1 of 2 for flow {client['id'][:8]}: one {MASKS['one']}: 429 ")
    assert attempt["response"]["status_code"] == 429
    assert client["comment"].endswith(f"| flow {client['id'][:8]}: its failed attempt is a flow of its own")
    headers = {k.lower(): v for k, v in attempt["request"]["headers"]}
    assert headers["authorization"] == f"Bearer {placeholder(fingerprint(ONE))}"
    assert leaked(json.dumps(flows).encode()) == []
