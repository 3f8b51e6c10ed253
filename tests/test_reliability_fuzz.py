"""Issue 5 item 8: fuzzing. tests/test_classify.py already runs hypothesis over the classifier and the retry-time
parsers (never an exception, always a well-formed outcome: test_classify_total_and_well_formed,
test_parse_retry_after_total, test_retry_delay_total, test_decode_body_total, test_error_message_total). This adds
what those leave out: the option parsers, the key and name rules, the credential handling on arbitrary headers
(including bytes that are not UTF-8), the error bodies the proxy writes itself, the connection-error verdict and the
error-message reader on arbitrary JSON.
"""

from __future__ import annotations

import json
import string

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http

from kimi_rotator.classify import MAX_COOLDOWN, classify, classify_connection_error, error_message
from kimi_rotator.envelopes import error_body, error_response, is_anthropic_route, local_headers
from kimi_rotator.keys import KeyFormatError, fingerprint, mask, validate_key, validate_name
from kimi_rotator.models import OutcomeKind, Scope, Surface
from kimi_rotator.routing import (
    PLACEHOLDER_PREFIX,
    client_credential,
    credential_matches,
    hide_credential,
    is_placeholder,
    normalize_host,
    parse_host_map,
    parse_resolve,
    with_credential,
)

hostish = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["api.kimi.com", "API.KIMI.COM.", "[::1]", "127.0.0.1", "a..b", "xn--", "-", "ä.test", ""]),
)
ports = st.one_of(st.integers(-5, 70000).map(str), st.text(max_size=6), st.just(""))
resolve_entries = st.one_of(
    st.text(max_size=60),
    st.builds(lambda h, a, p, sep: f"{h}={a}{sep}{p}", hostish, hostish, ports, st.sampled_from([":", "", "::", "]:"])),
)
host_map_entries = st.one_of(
    st.text(max_size=60),
    st.builds(lambda h, s: f"{h}={s}", hostish,
              st.one_of(st.sampled_from([s.value for s in Surface]), st.text(max_size=10))),
)


@settings(max_examples=300)
@given(st.lists(resolve_entries, max_size=4))
def test_parse_resolve_total(entries: list[str]) -> None:
    try:
        table = parse_resolve(entries)
    except ValueError as e:
        assert "kimi_resolve entry" in str(e)  # says which entry and what shape it should have
        return
    for host, (address, port) in table.items():
        assert host == normalize_host(host)
        assert isinstance(address, str) and isinstance(port, int) and 0 <= port <= 65535


@settings(max_examples=300)
@given(st.lists(host_map_entries, max_size=4))
def test_parse_host_map_total(entries: list[str]) -> None:
    try:
        table = parse_host_map(entries)
    except ValueError as e:
        assert "kimi_hosts entry" in str(e)
        return
    assert {"api.kimi.com", "api.moonshot.cn", "api.moonshot.ai"} <= set(table)
    assert all(isinstance(s, Surface) and h == normalize_host(h) for h, s in table.items())


key_texts = st.one_of(
    st.text(max_size=140),
    st.builds(lambda p, body: p + body, st.sampled_from(["sk-", "sk-kimi-", " sk-kimi-", "SK-"]),
              st.text(alphabet=string.ascii_letters + string.digits + "-_ \t\n./+=é", max_size=130)),
)


@settings(max_examples=400)
@given(key_texts, st.sampled_from(list(Surface)))
def test_validate_key_total(text: str, surface: Surface) -> None:
    try:
        key = validate_key(text, surface)
    except KeyFormatError as e:
        body = text.strip()
        if len(body) > 12:
            assert body not in str(e)  # an error never repeats the key
        return
    assert key == text.strip() and 20 <= len(key) <= 128 and key.startswith("sk-")
    assert key.startswith("sk-kimi-") == (surface is Surface.KIMI_CODE)
    assert set(key) <= set(string.ascii_letters + string.digits + "-_")
    # What may be shown of a valid key reveals at most its last 4 characters.
    shown = mask(key)
    assert shown.endswith(key[-4:]) or shown.endswith("…")
    assert len(shown.replace("…", "")) <= len("sk-kimi-") + 4
    assert key not in fingerprint(key) and len(fingerprint(key)) == 10


@given(st.text(max_size=80))
def test_validate_name_total(text: str) -> None:
    try:
        name = validate_name(text)
    except KeyFormatError:
        return
    assert name == text.strip() and 0 < len(name) <= 64 and not name.isdigit()


header_names = st.one_of(st.sampled_from(["Authorization", "authorization", "X-Api-Key", "x-api-key", "Host",
                                          "User-Agent", "X-Msh-Platform"]),
                         st.binary(min_size=1, max_size=12).filter(lambda b: b":" not in b))
header_values = st.one_of(st.binary(max_size=40), st.sampled_from([b"Bearer x", b"bearer  y ", b"Basic z", b"",
                                                                   b"Bearer \xff\xfe", b"Bearer kimi-rotate:abc"]))


def make_headers(pairs: list[tuple[bytes | str, bytes]]) -> http.Headers:
    return http.Headers([(k.encode() if isinstance(k, str) else k, v) for k, v in pairs])


SECRET = "sk-kimi-" + "Q" * 40 + "f00d"


@settings(max_examples=400)
@given(st.lists(st.tuples(header_names, header_values), max_size=6), st.sampled_from(["/v1/chat/completions",
                                                                                      "/coding/v1/messages", "/x?y"]))
def test_credential_handling_total(pairs: list[tuple[bytes | str, bytes]], path: str) -> None:
    headers = make_headers(pairs)
    client_credential(headers)
    is_placeholder(headers)
    assert credential_matches(headers, "tok-" + "z" * 20) in (True, False)

    swapped = http.Headers(with_credential(headers.fields, SECRET, path))
    values = [v for k, v in swapped.fields if k.lower() in (b"authorization", b"x-api-key")]
    assert values and all(SECRET.encode() in v for v in values)  # every credential header carries the key
    names = [k.lower() for k, _ in swapped.fields if k.lower() in (b"authorization", b"x-api-key")]
    assert len(names) == len(set(names))  # once each: a client's second credential never reaches Kimi
    # Nothing else was touched.
    others = [(k.lower(), v) for k, v in headers.fields if k.lower() not in (b"authorization", b"x-api-key")]
    assert [(k.lower(), v) for k, v in swapped.fields if k.lower() not in (b"authorization", b"x-api-key")] == others

    hide_credential(swapped, "0123456789")
    assert SECRET.encode() not in b"".join(k + v for k, v in swapped.fields)
    assert is_placeholder(swapped) and PLACEHOLDER_PREFIX.encode() in b"".join(v for _, v in swapped.fields)


def test_credential_matches_on_bytes_that_are_not_utf8() -> None:
    """A client may send any bytes; the token check must answer, not raise (which skipped it as an addon error)."""
    headers = make_headers([("authorization", b"Bearer \xff\xfetok"), ("x-api-key", b"\x80")])
    assert credential_matches(headers, "tok") is False
    assert credential_matches(make_headers([("x-api-key", b"tok-\xe9")]), "tok-é") is False


@given(st.integers(100, 599), st.text(max_size=200), st.text(max_size=80))
def test_local_error_bodies_are_valid_envelopes(status: int, message: str, path: str) -> None:
    doc = json.loads(error_body(status, message, path))
    if is_anthropic_route(path):
        assert doc["type"] == "error" and doc["error"]["message"] == message
    else:
        assert doc["error"]["message"] == message and doc["error"]["code"] == status
    response = error_response(status, message, path)
    assert response.status_code == status and json.loads(response.content or b"{}") == doc


# Finite only: a wait comes from a stored cooldown deadline, and every importer refuses inf and nan
# (allow_inf_nan=False), while the classifier caps deadlines at MAX_COOLDOWN.
@given(st.one_of(st.none(), st.floats(-1e18, 1e18)))
def test_local_headers_total(retry_after: float | None) -> None:
    headers = local_headers(retry_after)
    assert headers["content-type"] == "application/json"
    if retry_after is not None:
        seconds = int(headers["retry-after"])
        assert seconds >= 1
        assert seconds >= min(retry_after, MAX_COOLDOWN) - 1
        assert headers["x-should-retry"] in ("true", "false")


@given(st.text(max_size=300))
def test_connection_error_verdict_total(reason: str) -> None:
    verdict = classify_connection_error(reason)
    out = verdict.outcome
    assert (out.kind, out.scope, out.until, verdict.failover) == (OutcomeKind.SERVER_ERROR, Scope.SERVER, None, True)
    assert len(out.reason) <= len("connection error: ") + 120 and "\n" not in out.reason


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(
        st.one_of(st.sampled_from(["error", "type", "message", "errorMessage", "code"]), st.text(max_size=8)),
        inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=300)
@given(json_values, st.integers(400, 599))
def test_error_message_and_classify_on_arbitrary_json(doc: object, status: int) -> None:
    body = json.dumps(doc).encode()
    etype, message = error_message(body)
    assert etype is None or isinstance(etype, str)
    assert isinstance(message, str)
    verdict = classify(status, [], body, 1_800_000_000.0)
    assert verdict.outcome.kind is not OutcomeKind.SUCCESS
