"""Issue 5 item 7: the secret audit.

A real `mitmdump -s kimi_rotate.py` runs with everything that could write a key turned up: `termlog_verbosity=debug`,
`proxy_debug=true` (mitmproxy logs every protocol event), `-w` saved flows and a HAR export (`hardump`). Representative
traffic goes through it: successes buffered and streamed (curl over HTTP/2, httpx over HTTP/1.1, both credential
styles), failovers (429, 401, 5xx, a dropped connection) buffered and streamed, request errors passed through, a stream
cut in the middle, non-ASCII headers, the local 429 when every key cools. The CLI runs list-keys (text and JSON),
stats, export-keys, use-key, rotate, disable/enable and clear-limits on the same store.

Then every byte written is searched for every stored key, raw, percent-encoded, hex and base64 (standard and
URL-safe, every alignment): proxy stdout and stderr, the flows file, the HAR file, all CLI output, every file in the
proxy's working folder, its mitmproxy confdir and the store folder (the store database itself excepted: it is where
keys live), and the export. Zero hits, counting also any 12 consecutive characters of a key (the test keys are
random-looking, so a log line cut off in the middle of a key is a finding too). The proxy's /proc environ and
cmdline hold no key either. A positive control checks the scanner finds the keys where they are (the store).
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakekimi import FakeKimi, Reply
from harness import (
    CHAT_BODY,
    KC_CHAT,
    KC_MESSAGES,
    MESSAGES_BODY,
    OP_CHAT,
    KeySpec,
    ProxyProcess,
    curl,
    reset_store,
    run_cli,
    stream_request,
    upstream_options,
    wait_keys,
)
from test_reliability_support import find_secrets

from kimi_rotator.models import Surface

pytestmark = [pytest.mark.e2e]

def random_key(prefix: str, seed: str) -> str:
    """A random-looking fake key, so that even a dozen of its characters found anywhere is a finding."""
    return prefix + hashlib.sha256(f"kimi-rotate audit {seed}".encode()).hexdigest()[:40]


KEYS = [KeySpec(random_key("sk-kimi-", f"code-{i}"), f"code-{i}", account=f"acct-{i}") for i in range(1, 7)]
KEYS.append(KeySpec(random_key("sk-", "china"), "china-1", Surface.MOONSHOT_CN, account="acct-cn"))
PARTIAL = 12  # characters of a key's private part that count as a leak (list-keys shows the last 4)
SECRETS = [s.secret for s in KEYS]
CODE_KEYS = [s for s in KEYS if s.surface is Surface.KIMI_CODE]
STORE_FILES = {"store.db", "store.db-wal", "store.db-shm"}


def files_under(*roots: Path) -> list[Path]:
    out = []
    for root in roots:
        if root.is_file():
            out.append(root)
        elif root.is_dir():
            out += [p for p in sorted(root.rglob("*")) if p.is_file()]
    return out


def traffic(proxy: ProxyProcess, fake: FakeKimi) -> dict[str, int]:
    """Representative requests; returns status counts (the audit needs the traffic to have really happened)."""
    statuses: dict[str, int] = {}
    verify = ssl.create_default_context(cafile=str(proxy.ca))

    def note(label: str, status: int) -> None:
        statuses[f"{label}:{status}"] = statuses.get(f"{label}:{status}", 0) + 1

    bearer = {"authorization": "Bearer sk-client-placeholder"}
    api_key = {"x-api-key": "sk-client-placeholder"}
    stream_body = {**MESSAGES_BODY, "stream": True}
    with httpx.Client(proxy=proxy.url, verify=verify, trust_env=False, timeout=20) as c:
        # successes, both styles, buffered and streamed, HTTP/1.1 and HTTP/2
        note("ok", c.post(KC_CHAT, json=CHAT_BODY, headers=bearer).status_code)
        note("ok", c.post(KC_MESSAGES, json=MESSAGES_BODY, headers={**bearer, **api_key}).status_code)
        note("ok-stream", stream_request(c, KC_MESSAGES, body=stream_body, headers=api_key).status)
        note("ok-h2", curl(proxy, KC_CHAT, headers=bearer, body=CHAT_BODY).status)
        note("ok-h2-stream", curl(proxy, KC_MESSAGES, headers=api_key, body=stream_body).status)
        note("ok-cn", c.post(OP_CHAT, json=CHAT_BODY, headers=bearer).status_code)
        note("non-ascii", c.post(KC_CHAT, json=CHAT_BODY, headers={**bearer, "x-title": "Проект".encode()}).status_code)
        # failovers, buffered and streamed: the key that served the conversation last (it stays on it) fails first
        by_name = {k.name: k.secret for k in KEYS}
        served: dict[str, str] = {}  # path (each path here carries one conversation) -> the key that served it last

        def remember() -> None:
            for s in fake.requests:
                if s.status == 200 and s.key_name and s.host_header == "api.kimi.com":
                    served[s.path] = s.key_name

        remember()
        for reply in (Reply.rate_limit(30), Reply.server_error(), Reply.invalid()):
            for label, stream in (("failover", False), ("failover-stream", True)):
                path = "/coding/v1/messages" if stream else "/coding/v1/chat/completions"
                fake.reset()
                fake.script(by_name[served[path]], [reply])
                if stream:
                    note(label, stream_request(c, KC_MESSAGES, body=stream_body, headers=api_key).status)
                else:
                    note(label, c.post(KC_CHAT, json=CHAT_BODY, headers=bearer).status_code)
                assert len(fake.requests) == 2, [(r.key_name, r.status) for r in fake.requests]
                remember()
        fake.reset()
        fake.fault(None, "close_before_headers", times=1)
        note("dropped", c.post(KC_CHAT, json={**CHAT_BODY, "stream": True}, headers=bearer).status_code)
        # request errors passed through, and a stream cut in the middle
        for k in CODE_KEYS:
            fake.script(k.secret, [Reply.content_filter()])
        note("filtered", c.post(KC_CHAT, json=CHAT_BODY, headers=bearer).status_code)
        fake.reset()
        for k in CODE_KEYS:
            fake.fault(k.secret, "reset_midstream", times=1)
        try:
            note("cut", stream_request(c, KC_CHAT, body={**CHAT_BODY, "stream": True}, headers=bearer).status)
        except httpx.HTTPError:
            note("cut", 0)
        fake.reset()
        # every key cooling: the local 429
        for k in CODE_KEYS:
            fake.script(k.secret, [Reply.rate_limit(300)] * 2)
        note("cooling", c.post(KC_CHAT, json=CHAT_BODY, headers=bearer).status_code)
        note("cooling", c.post(KC_MESSAGES, json=MESSAGES_BODY, headers=api_key).status_code)
        fake.reset()
    return statuses


def test_no_key_in_any_byte_written(
    tmp_path: Path, pki: Any, mitm_confdir: Path, fake_kimi: FakeKimi, proxy_factory: Any
) -> None:
    for spec in KEYS:
        fake_kimi.add_key(spec.secret, account=spec.account or "none", name=spec.name)
    home = proxy_factory.home("audit-home")
    reset_store(home, KEYS)
    flows, har = tmp_path / "flows.mitm", tmp_path / "flows.har"
    options = {**upstream_options(fake_kimi.port, pki.ca_cert), "kimi_max_wait": 0,
               "termlog_verbosity": "debug", "proxy_debug": True, "hardump": str(har)}
    proxy = proxy_factory(home, options, dump=flows)
    assert proxy.proc is not None
    pid = proxy.proc.pid

    # The proxy's environment and command line hold no key (keys live in the store only).
    process_bytes = Path(f"/proc/{pid}/environ").read_bytes() + Path(f"/proc/{pid}/cmdline").read_bytes()
    assert find_secrets(process_bytes, SECRETS, "proxy environ/cmdline", PARTIAL) == []

    statuses = traffic(proxy, fake_kimi)
    assert statuses.get("ok:200") == 2 and statuses.get("ok-stream:200") == 1, statuses
    assert statuses.get("failover:200") == 3 and statuses.get("failover-stream:200") == 3, statuses
    assert statuses.get("cooling:429") == 2 and statuses.get("filtered:400") == 1, statuses
    wait_keys(home, lambda ks: sum(k.total_requests for k in ks) >= 20)

    cli_out = b""
    export = tmp_path / "backup.kimi"
    for args, stdin in [
        (["list-keys"], None), (["list-keys", "--json"], None), (["stats"], None),
        (["use-key", "code-2"], None), (["clear-limits", "all"], None), (["rotate"], None),
        (["disable", "code-3"], None), (["enable", "code-3"], None),
        (["export-keys", str(export)], "audit passphrase 123\naudit passphrase 123\n"),
    ]:
        r = run_cli(home, *args, input=stdin)
        # rotate stays on the current key's surface; with that surface's other keys disabled it says so cleanly.
        refused = args == ["rotate"] and r.returncode == 1 and r.stderr.startswith("error: no other kimi-code key")
        assert r.returncode == 0 or refused, (args, r.stdout, r.stderr)
        cli_out += f"$ kimi-rotate {' '.join(args)}\n{r.stdout}{r.stderr}".encode()
    assert export.exists()
    time.sleep(0.5)  # the proxy sees the CLI's edits
    proxy.stop()  # writes the HAR; flushes flows and logs

    assert har.exists() and flows.exists()
    har_doc = json.loads(har.read_bytes())
    assert len(har_doc["log"]["entries"]) >= 15  # the HAR really holds the traffic
    debug_log = proxy.log_bytes()
    assert b"DEBUG" in debug_log or b"<< " in debug_log or len(debug_log) > 20_000  # debug logging was really on

    hits = find_secrets(debug_log, SECRETS, "proxy stdout+stderr", PARTIAL)
    hits += find_secrets(cli_out, SECRETS, "CLI output", PARTIAL)
    store_hits = []
    scanned = files_under(proxy.workdir, proxy.confdir, home, flows, har, export, tmp_path)
    for path in scanned:
        if path.parent == home and path.name in STORE_FILES:
            store_hits += find_secrets(path.read_bytes(), SECRETS, str(path))
            continue
        hits += find_secrets(path.read_bytes(), SECRETS, str(path), PARTIAL)
    assert hits == []
    assert {flows, har, export, proxy.stdout_path, home / "events.jsonl"} <= set(scanned)
    # Positive control: the scanner does find the keys where they are stored.
    assert len({h.rsplit("…", 1)[1] for h in store_hits}) == len(SECRETS), store_hits


def test_scanner_finds_every_spelling() -> None:
    """The search is only as good as its spellings: each must be found inside surrounding text."""
    import base64
    import urllib.parse

    secret = SECRETS[0]
    for prefix in (b"", b"a", b"ab", b"Bearer "):
        blob = prefix + secret.encode() + b"\r\n"
        for encoded in (blob, base64.b64encode(blob), base64.urlsafe_b64encode(blob),
                        urllib.parse.quote(blob.decode()).encode(), blob.hex().encode()):
            assert find_secrets(b"xx" + encoded + b"yy", [secret], "probe"), (prefix, encoded)
    assert find_secrets(os.urandom(1 << 16), SECRETS, "noise", PARTIAL) == []
    cut = SECRETS[0][: len("sk-kimi-") + PARTIAL] + "…"  # a log line cut after a dozen characters of the key
    assert find_secrets(cut.encode(), [SECRETS[0]], "probe", PARTIAL)
