"""The flows views get besides the client's own: attempt flows and the bounded copy of a streamed answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mitmproxy import options
from mitmproxy.test import tflow
from mitmproxy.tools.dump import DumpMaster
from mitmproxy.tools.web.master import WebMaster

from kimi_rotator.addon import KimiRotate
from kimi_rotator.failover import ATTEMPT_BODY_LIMIT, Attempt
from kimi_rotator.flowview import STREAM_COPY_LIMIT, StreamCopy, attempt_flows, keeps_flows, link_note
from kimi_rotator.proxy import ProxyConfig, build_master
from kimi_rotator.routing import placeholder


def test_a_stream_copy_passes_every_chunk_on_and_keeps_at_most_its_bound() -> None:
    copy = StreamCopy()
    chunks = [b"a" * (STREAM_COPY_LIMIT // 2), b"b" * (STREAM_COPY_LIMIT // 2 - 1), b"cd", b"efgh", b""]
    assert [copy(c) for c in chunks] == chunks  # unchanged, the same objects: nothing is copied on the way
    assert all(copy(c) is c for c in chunks[:1])
    assert len(copy.data) == STREAM_COPY_LIMIT and copy.data.endswith(b"b" * 10 + b"c")
    assert copy.cut and copy.note() == " (stream copy cut at 1 MiB)"


def test_a_stream_copy_within_its_bound_is_whole() -> None:
    copy = StreamCopy()
    for chunk in (b"data: 1\n\n", b"data: [DONE]\n\n", b""):
        copy(chunk)
    assert bytes(copy.data) == b"data: 1\n\ndata: [DONE]\n\n" and not copy.cut and copy.note() == ""


def test_attempt_flows_show_each_attempt_with_its_keys_placeholder() -> None:
    client = tflow.tflow(resp=True)
    client.request.headers["authorization"] = "Bearer kimi-rotate:served"
    refused = Attempt(fingerprint="aaaa", sent=10.0, answered=10.5, status=429, reason=b"Too Many Requests",
                      headers=((b"content-type", b"application/json"), (b"msh-uid", b"acct")), body=b'{"error": 1}',
                      summary="one sk-kimi-…0001: 429 rate_limit_reached_error, account cooling 60 s")
    long = Attempt(fingerprint="bbbb", sent=11.0, answered=11.2, status=500, body=b"x" * ATTEMPT_BODY_LIMIT,
                   headers=((b"content-encoding", b"gzip"),), body_cut=True, summary="two sk-kimi-…0002: 500")
    lost = Attempt(fingerprint="cccc", sent=12.0, answered=12.1, error="kimi-rotate could not reach Kimi: reset",
                   summary="three sk-kimi-…0003: connection error: BrokenResponse")
    first, second, third = attempt_flows(client, [refused, long, lost], 4)
    short = client.id[:8]
    assert first.comment == f"attempt 1 of 4 for flow {short}: {refused.summary}"
    assert first.request.headers["authorization"] == f"Bearer {placeholder('aaaa')}"
    assert client.request.headers["authorization"] == "Bearer kimi-rotate:served"  # the client's flow is untouched
    assert first.response is not None and first.response.status_code == 429
    assert first.response.reason == "Too Many Requests" and first.response.headers["msh-uid"] == "acct"
    assert first.response.content == b'{"error": 1}' and first.request.timestamp_start == 10.0
    assert (first.response.timestamp_start, first.error) == (10.5, None)
    assert first.id != client.id and first.client_conn is client.client_conn
    assert second.comment == f"attempt 2 of 4 for flow {short}: two sk-kimi-…0002: 500 (body cut at 64 KiB)"
    assert second.response is not None and "content-encoding" not in second.response.headers  # kept decoded
    assert second.response.content == b"x" * ATTEMPT_BODY_LIMIT
    assert third.response is None and third.error is not None and third.error.msg == lost.error
    assert third.request.headers["authorization"] == f"Bearer {placeholder('cccc')}"


def test_the_client_flows_note_names_it_and_says_how_many_attempts_are_shown() -> None:
    client = tflow.tflow()
    short = client.id[:8]
    assert link_note(client, 1, 1) == f" | flow {short}: its failed attempt is a flow of its own"
    assert link_note(client, 2, 2) == f" | flow {short}: its failed attempts are flows of their own"
    assert link_note(client, 10, 14).endswith("are flows of their own (the first 10 shown)")


async def test_only_masters_that_show_or_save_flows_get_attempt_flows(tmp_path: Path, kimi_home: Path) -> None:
    """`kimi-rotate proxy` (the slim master) keeps no flows, so it pays nothing for attempt flows or stream copies;
    mitmdump (its save addon, for -w) and mitmweb (its view) do."""
    slim = build_master(ProxyConfig(sets=(f"confdir={tmp_path / 'conf'}",)), asyncio.get_running_loop())
    assert not keeps_flows()
    rotate = next(a for a in slim.addons.chain if isinstance(a, KimiRotate))
    rotate.done()
    DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
    assert keeps_flows()
    WebMaster(options.Options(), with_termlog=False)
    assert keeps_flows()
