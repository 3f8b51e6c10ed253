"""End-to-end: what mitmproxy shows and saves of Kimi flows.

No pooled key may appear in a `-w` dump, a HAR export or the proxy's output, even at `termlog_verbosity=debug` with
`flow_detail=4` (which prints every header); each Kimi flow carries a comment naming its attempts, and failed-over
flows are marked; a saved flow replays through the addon and gets a real key again.

One proxy serves a scripted mix of traffic; it is stopped (SIGTERM, as a user would) before the dump and logs are read.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakekimi import FakeKimi, Reply
from harness import (
    CHAT_BODY,
    KC_CHAT,
    KC_MESSAGES,
    KIMI_SCRIPT,
    MESSAGES_BODY,
    MITMDUMP,
    OP_CHAT,
    PLACEHOLDER,
    KeySpec,
    _clean_env,
    _option_args,
    curl,
    kimi_key,
    platform_key,
    proxy_client,
    reset_store,
    stream_request,
    upstream_options,
    wait_keys,
)
from mitmproxy import http, io

from kimi_rotator.keys import fingerprint
from kimi_rotator.models import Surface
from kimi_rotator.routing import PLACEHOLDER_PREFIX
from kimi_rotator.store import HOME_ENV

pytestmark = pytest.mark.e2e

ONE, TWO, THREE = kimi_key("0v01"), kimi_key("0v02"), kimi_key("0v03")
CN = platform_key("0v04")
KEYS = [
    KeySpec(ONE, "one", account="acct-1"),
    KeySpec(TWO, "two", account="acct-2"),
    KeySpec(THREE, "three", account="acct-3"),
    KeySpec(CN, "china", Surface.MOONSHOT_CN, account="acct-cn"),
]
SECRETS = [s.secret for s in KEYS]
MARK = ":arrows_counterclockwise:"


def leaked(data: bytes) -> list[str]:
    """Names of the keys whose secret (or its part after the common prefix) occurs in `data`."""
    out = []
    for spec in KEYS:
        tail = spec.secret.split("-", 2)[-1].encode()  # "test…" without "sk-kimi-" / "sk-"
        if spec.secret.encode() in data or tail in data:
            out.append(spec.name)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, module_proxy_factory: Any, fake_kimi_server: FakeKimi, pki: Any
        ) -> Iterator[dict[str, Any]]:
    """Drive a scripted mix of Kimi traffic through a proxy writing `-w`, then stop it. Yields what happened."""
    fake = fake_kimi_server
    for spec in KEYS:
        fake.add_key(spec.secret, account=spec.account or "none", name=spec.name)
    root = tmp_path_factory.mktemp("visibility")
    home, dump, har = root / "home", root / "flows.mitm", root / "flows.har"
    reset_store(home, KEYS)
    # Per-request picks (no conversation pins), so that the script below knows which key each request reaches.
    options = {**upstream_options(fake.port, pki.ca_cert), "kimi_max_wait": 0, "kimi_affinity": False,
               "termlog_verbosity": "debug", "flow_detail": 4, "hardump": str(har)}
    proxy = module_proxy_factory(home, options, dump=dump)
    fake.reset()
    bearer = {"authorization": f"Bearer {PLACEHOLDER}", "x-custom": "shown-by-flow-detail"}
    both = {"authorization": f"Bearer {PLACEHOLDER}", "x-api-key": PLACEHOLDER}
    statuses = {}

    statuses["plain"] = curl(proxy, KC_CHAT, headers=bearer, body=CHAT_BODY).status  # one: 200
    fake.script(ONE, [Reply.rate_limit(retry_after=60)])
    statuses["buffered-failover"] = curl(proxy, KC_MESSAGES, headers={"x-api-key": PLACEHOLDER},
                                         body=MESSAGES_BODY).status  # one: 429 → two: 200
    fake.script(TWO, [Reply.invalid()])
    with proxy_client(proxy) as client:
        statuses["stream-failover"] = stream_request(
            client, KC_MESSAGES, body={**MESSAGES_BODY, "stream": True}, headers={"x-api-key": PLACEHOLDER}
        ).status  # two: 401 → three: 200
        statuses["stream"] = stream_request(client, KC_CHAT, body={**CHAT_BODY, "stream": True},
                                            headers=both).status
        statuses["models"] = client.get("https://api.kimi.com/coding/v1/models", headers=bearer).status_code
    fake.script(THREE, [Reply.content_filter()])
    statuses["content-filter"] = curl(proxy, KC_CHAT, headers=both, body=CHAT_BODY).status
    statuses["moonshot"] = curl(proxy, OP_CHAT, headers=bearer, body=CHAT_BODY).status
    fake.fault(THREE, "close_before_headers", times=1)
    statuses["connection-lost"] = curl(proxy, KC_CHAT, headers=bearer, body=CHAT_BODY).status
    wait_keys(home, lambda ks: sum(k.total_requests for k in ks) >= 10)
    seen = [(r.key_name, r.status) for r in fake.requests]
    proxy.stop()
    with open(dump, "rb") as f:
        flows = [fl for fl in io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
    yield {"proxy": proxy, "home": home, "dump": dump, "har": har, "flows": flows, "statuses": statuses, "seen": seen,
           "root": root}


def kimi_flows(run: dict[str, Any]) -> list[http.HTTPFlow]:
    return [f for f in run["flows"] if f.request.path.startswith(("/coding/", "/v1/"))]


def test_the_traffic_went_as_scripted(run: dict[str, Any]) -> None:
    assert run["statuses"] == {"plain": 200, "buffered-failover": 200, "stream-failover": 200, "stream": 200,
                               "models": 200, "content-filter": 400, "moonshot": 200,
                               "connection-lost": run["statuses"]["connection-lost"]}
    assert run["statuses"]["connection-lost"] in (200, 502)
    assert run["seen"][:6] == [("one", 200), ("one", 429), ("two", 200), ("two", 401), ("three", 200),
                               ("three", 200)]


def test_no_key_in_the_saved_flows(run: dict[str, Any]) -> None:
    data = run["dump"].read_bytes()
    assert len(kimi_flows(run)) >= 8
    assert leaked(data) == []
    har = run["har"].read_bytes()
    assert har.count(b'"request"') >= 8  # the HAR export holds the Kimi flows too
    assert leaked(har) == []
    for flow in kimi_flows(run):
        for name in ("authorization", "x-api-key"):
            value = flow.request.headers.get(name)
            if value is not None:
                assert PLACEHOLDER_PREFIX in value or PLACEHOLDER in value, (flow.request.path, name, value)


def test_no_key_in_the_proxy_output(run: dict[str, Any]) -> None:
    output = run["proxy"].log_bytes()
    assert b"shown-by-flow-detail" in output  # flow_detail=4 printed request headers: the check below means something
    assert b"client connect" in output
    assert leaked(output) == []
    assert leaked("\n".join(run["proxy"].guard_hits()).encode()) == []


def test_the_proxy_prints_a_line_per_kimi_request_and_per_key_state_change(run: dict[str, Any]) -> None:
    """The same lines as `kimi-rotate proxy` prints (tests/test_setup_commands.py), here under `mitmdump -s`."""
    output = run["proxy"].log_text()
    one, two, three = (f"{name} sk-kimi-…{secret[-4:]}" for name, secret in (("one", ONE), ("two", TWO),
                                                                             ("three", THREE)))
    ms = r"\d+ (ms|\.\d s)"
    assert re.search(rf"\] kimi-code POST /coding/v1/messages {two} 200 {ms} \({one}: 429 rate_limit_reached_error, "
                     rf"account cooling (59|60) s → {two}: 200\)\n", output), output
    assert re.search(rf"\] kimi-code POST /coding/v1/messages {three} 200 {ms} \({two}: 401 \w+, disabled → "
                     rf"{three}: 200\)\n", output), output
    assert re.search(rf"\] kimi-code POST /coding/v1/chat/completions {one} 200 {ms}\n", output), output
    assert re.search(rf"\] key {one} cooling until \d\d:\d\d:\d\d \((59|60) s\): 429 rate_limit_reached_error\n",
                     output), output
    assert re.search(rf"\] key {two} disabled: 401 \w+; once it works again, `kimi-rotate enable two` puts it back\n",
                     output), output


def test_failed_over_flows_are_commented_and_marked(run: dict[str, Any]) -> None:
    by_comment = {f.comment: f for f in kimi_flows(run)}
    masks = {name: f"sk-kimi-…{secret[-4:]}" for name, secret in
             (("one", ONE), ("two", TWO), ("three", THREE))}

    buffered = next(f for c, f in by_comment.items() if c.startswith(f"one {masks['one']}: 429"))
    link = rf" \| flow {buffered.id[:8]}: its failed attempt is a flow of its own"  # tests/test_e2e_flowview.py
    assert re.fullmatch(rf"one {masks['one']}: 429 rate_limit_reached_error, account cooling (59|60) s → "
                        rf"two {masks['two']}: 200{link}", buffered.comment), buffered.comment
    assert buffered.marked == MARK
    assert buffered.response is not None and buffered.response.status_code == 200

    streamed = next(f for c, f in by_comment.items() if c.startswith(f"two {masks['two']}: 401"))
    link = rf" \| flow {streamed.id[:8]}: its failed attempt is a flow of its own"
    assert re.fullmatch(rf"two {masks['two']}: 401 \w+, disabled → three {masks['three']}: 200{link}",
                        streamed.comment), streamed.comment
    assert streamed.marked == MARK
    assert streamed.request.pretty_host == "api.kimi.com"  # the relay detour is not what the flow shows

    plain = [f for f in kimi_flows(run) if f.comment.count("→") == 0 and f.comment.endswith(": 200")]
    assert plain and all(not f.marked for f in plain)


def test_saved_flows_replay_through_the_addon(run: dict[str, Any], fake_kimi_server: FakeKimi, pki: Any) -> None:
    """Replaying a saved flow (as mitmweb's replay does) goes through the addon again and gets a real key."""
    fake = fake_kimi_server
    chosen = [f for f in kimi_flows(run) if f.response is not None and f.response.status_code == 200
              and f.request.method == "POST"][:3]
    assert len(chosen) == 3
    root: Path = run["root"]
    replay_in, replay_out = root / "replay-in.mitm", root / "replay-out.mitm"
    with open(replay_in, "wb") as f:
        writer = io.FlowWriter(f)
        for flow in chosen:
            writer.add(flow)
    reset_store(run["home"], KEYS)
    fake.reset()
    options = {**upstream_options(fake.port, pki.ca_cert), "kimi_max_wait": 0}
    cmd = [str(MITMDUMP), "-n", "-s", str(KIMI_SCRIPT), "-C", str(replay_in), "-w", str(replay_out),
           "--set", f"confdir={run['proxy'].confdir}", *_option_args(options)]
    env = _clean_env({HOME_ENV: str(run["home"])})
    result = subprocess.run(cmd, env=env, capture_output=True, timeout=60, check=False, cwd=root)
    assert result.returncode == 0, result.stdout.decode()[-3000:] + result.stderr.decode()[-3000:]
    assert [r.status for r in fake.requests] == [200, 200, 200]
    assert all(r.key_name in ("one", "two", "three", "china") for r in fake.requests)
    data = replay_out.read_bytes() + result.stdout + result.stderr
    assert leaked(data) == []
    assert os.path.getsize(replay_out) > 0


def test_fingerprints_name_the_keys_in_placeholders(run: dict[str, Any]) -> None:
    prints = {fingerprint(s) for s in SECRETS}
    found = set()
    for flow in kimi_flows(run):
        for name in ("authorization", "x-api-key"):
            value = flow.request.headers.get(name, "")
            if PLACEHOLDER_PREFIX in value:
                found.add(value.split(PLACEHOLDER_PREFIX, 1)[1])
    assert found - {"relay"} <= prints and found - {"relay"}
