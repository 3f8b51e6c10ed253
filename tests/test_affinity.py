"""Conversation and file affinity (kimi_rotator/affinity.py): which conversation a request belongs to, the pins
that keep a conversation on its account, and which requests name an account's file."""

from __future__ import annotations

import json
import re
from typing import Any
from unittest import mock

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kimi_rotator import affinity
from kimi_rotator.affinity import Conversation, FileRoute, Pin, Pins, conversation, file_route, uploaded_file_id
from kimi_rotator.models import Surface

OA = "/v1/chat/completions"
AN = "/v1/messages"
SESSION = "8f14e45f-ceea-467e-a4b2-9e5d0c3f1a2b"


def oa(doc: dict[str, Any], **dumps: Any) -> Conversation | None:
    return conversation("POST", OA, json.dumps(doc, **dumps).encode(), None)


def an(doc: dict[str, Any], **dumps: Any) -> Conversation | None:
    return conversation("POST", AN, json.dumps(doc, **dumps).encode(), None)


def chat(*contents: str, system: str = "be brief") -> list[dict[str, Any]]:
    """A system message, then user and assistant messages taking turns."""
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    return [{"role": "system", "content": system}, *turns]


# ---------------------------------------------------------------------------------------------------------------------
# Identity sources and precedence
# ---------------------------------------------------------------------------------------------------------------------


def test_prompt_cache_key_names_an_openai_conversation() -> None:
    c = oa({"model": "kimi-k2.6", "messages": chat("hi"), "prompt_cache_key": SESSION})
    assert c is not None and c.how == "prompt_cache_key"
    assert re.fullmatch(r"[0-9a-f]{16}", c.id)
    # The same session is the same conversation whatever else the request says; another session is another one.
    assert oa({"messages": chat("other", "turn", "more"), "prompt_cache_key": SESSION}) == c
    assert oa({"messages": chat("hi"), "prompt_cache_key": SESSION + "x"}) != c


def test_metadata_user_id_names_an_anthropic_conversation() -> None:
    user_id = f"user_ab12_account__session_{SESSION}"
    c = an({"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": user_id}})
    assert c is not None and c.how == "metadata.user_id" and re.fullmatch(r"[0-9a-f]{16}", c.id)
    assert an({"messages": [{"role": "user", "content": "else"}], "metadata": {"user_id": user_id}}) == c
    # The same string as a prompt_cache_key is another identity, not a collision with it.
    assert oa({"messages": chat("hi"), "prompt_cache_key": user_id}) != c


def test_the_id_is_a_hash_that_shows_no_session_id_or_prompt() -> None:
    secret = "sess-0123456789abcdef"
    for c in (
        oa({"messages": chat("hi"), "prompt_cache_key": secret}),
        an({"messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": secret}}),
        oa({"messages": chat("my private prompt", system="my system prompt")}),
    ):
        assert c is not None and len(c.id) == 16
        assert not any(part in c.id for part in ("sess", "0123456789", "private", "system"))
        assert secret not in repr(c)


def test_each_format_reads_its_own_id_field() -> None:
    messages = chat("hi")
    by_prompt = oa({"messages": messages})
    assert by_prompt is not None and by_prompt.how == "prompt"
    # OpenAI's metadata is the client's own tags (a user id there may span every session): not a conversation id.
    assert oa({"messages": messages, "metadata": {"user_id": SESSION}}) == by_prompt
    both = {"messages": messages, "prompt_cache_key": SESSION, "metadata": {"user_id": "u"}}
    assert oa(both) == oa({"messages": messages, "prompt_cache_key": SESSION})
    anthropic = {"system": "be brief", "messages": [{"role": "user", "content": "hi"}]}
    assert an({**anthropic, "prompt_cache_key": SESSION}) == an(anthropic)
    assert an({**anthropic, "prompt_cache_key": SESSION, "metadata": {"user_id": "u"}}) == an(
        {**anthropic, "metadata": {"user_id": "u"}}
    )


@pytest.mark.parametrize("value", ["", 5, None, ["x"], {"id": "x"}])
def test_an_unusable_prompt_cache_key_falls_back_to_the_prompt(value: Any) -> None:
    messages = chat("hi")
    assert oa({"messages": messages, "prompt_cache_key": value}) == oa({"messages": messages})


@pytest.mark.parametrize("metadata", [{}, {"user_id": ""}, {"user_id": 7}, "user_x", None, [{"user_id": "u"}]])
def test_unusable_metadata_falls_back_to_the_prompt(metadata: Any) -> None:
    doc = {"system": "s", "messages": [{"role": "user", "content": "hi"}]}
    c = an({**doc, "metadata": metadata})
    assert c is not None and c.how == "prompt" and c == an(doc)


# ---------------------------------------------------------------------------------------------------------------------
# The prompt's hash
# ---------------------------------------------------------------------------------------------------------------------


def test_an_openai_prompt_is_its_leading_system_messages_and_first_user_message() -> None:
    first = oa({"messages": chat("fix the bug")})
    assert first is not None and first.how == "prompt"
    # Later turns are the same conversation ...
    assert oa({"messages": chat("fix the bug", "done", "thanks"), "model": "x", "stream": True}) == first
    # ... a different system prompt or first question is another one.
    assert oa({"messages": chat("fix the bug", system="be verbose")}) != first
    assert oa({"messages": chat("fix the other bug")}) != first
    # Developer messages are part of the system prompt; a system message after the conversation started is not.
    developer = {"role": "developer", "content": "use tabs"}
    with_developer = oa({"messages": [chat("x")[0], developer, *chat("fix the bug")[1:]]})
    assert with_developer not in (None, first)
    later_system = [*chat("fix the bug", "done"), {"role": "system", "content": "late"}]
    assert oa({"messages": later_system}) == first


def test_an_anthropic_prompt_is_its_system_and_first_user_message() -> None:
    doc = {"system": "be brief", "messages": [{"role": "user", "content": "fix the bug"}]}
    first = an(doc)
    assert first is not None and first.how == "prompt"
    later = [*doc["messages"], {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    assert an({**doc, "messages": later}) == first
    assert an({**doc, "system": "be verbose"}) != first
    assert an({"messages": doc["messages"]}) != first  # no system prompt at all


def test_the_prompt_hash_ignores_json_layout_and_key_order() -> None:
    doc = {
        "model": "kimi-for-coding",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "iVBORw0"}}]}],
        "system": [{"type": "text", "text": "be brief"}],
        "max_tokens": 100,
    }
    reordered = json.loads(json.dumps(doc), object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    assert list(reordered) != list(doc)
    first = an(doc)
    assert first is not None
    assert an(reordered, indent=4) == first
    assert an(doc, separators=(",", ":"), ensure_ascii=False) == first
    assert conversation("POST", AN, b"\n\t " + json.dumps(doc, indent=1).encode() + b"\r\n", None) == first


def test_text_given_as_a_string_or_as_text_parts_is_one_prompt() -> None:
    as_string = an({"system": "be brief", "messages": [{"role": "user", "content": "hi"}]})
    as_parts = an({
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    })
    assert as_string == as_parts
    assert oa({"messages": chat("hi")}) == oa({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]})


def test_cache_control_marks_do_not_change_the_prompt() -> None:
    # Claude Code marks the newest message: the first user message has the mark in turn 1 only.
    ephemeral = {"type": "ephemeral"}
    turn1 = an({
        "system": [{"type": "text", "text": "be brief", "cache_control": ephemeral}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": ephemeral}]}],
    })
    turn2 = an({
        "system": [{"type": "text", "text": "be brief", "cache_control": ephemeral}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "more", "cache_control": ephemeral}]},
        ],
    })
    assert turn1 is not None and turn1 == turn2


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'"messages"',
        b"{}",
        b'{"model": "m"}',
        b'{"messages": []}',
        b'{"messages": {"role": "user"}}',
        b'{"messages": [{"role": "assistant", "content": "hi"}]}',
        b'{"messages": [{"role": "system", "content": "s"}]}',
        b'{"messages": ["user"]}',
        b'{"messages": [{"role": "user", "content": "caf\xc3"}]}',  # not UTF-8
        b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "hi"}]}',  # a BOM: not what any client sends
    ],
)
def test_nothing_to_know_a_conversation_by(body: bytes) -> None:
    for path in (OA, AN):
        assert conversation("POST", path, body, None) is None


# ---------------------------------------------------------------------------------------------------------------------
# Routes and encodings
# ---------------------------------------------------------------------------------------------------------------------


def test_only_inference_requests_have_a_conversation() -> None:
    body = json.dumps({"messages": chat("hi"), "prompt_cache_key": SESSION}).encode()
    c = conversation("POST", OA, body, None)
    assert c is not None
    for method, path in [("POST", "/coding/v1/chat/completions"), ("post", OA + "?beta=1"),
                         ("POST", "/anthropic/v1/messages"), ("POST", "/coding/v1/messages?x=/y")]:
        assert conversation(method, path, body, None) is not None, path
    for method, path in [("GET", OA), ("PUT", AN), ("POST", "/v1/messages/count_tokens"), ("POST", "/v1/files"),
                         ("POST", "/v1/embeddings"), ("POST", "/v1/chat/completions/x"), ("POST", "/?p=/messages")]:
        assert conversation(method, path, body, None) is None, (method, path)


def test_a_compressed_body_is_not_read() -> None:
    body = json.dumps({"messages": chat("hi"), "prompt_cache_key": SESSION}).encode()
    assert conversation("POST", OA, body, "identity") == conversation("POST", OA, body, "") is not None
    for encoding in ("gzip", "br", "zstd", "deflate", "gzip, identity"):
        assert conversation("POST", OA, body, encoding) is None


# ---------------------------------------------------------------------------------------------------------------------
# Top-level fields only, wherever they stand
# ---------------------------------------------------------------------------------------------------------------------


def test_a_key_name_inside_message_text_is_not_the_field() -> None:
    text = f'Set "prompt_cache_key": "{SESSION}" and "metadata": {{"user_id": "{SESSION}"}} in the body'
    plain = oa({"messages": chat(text)})
    assert plain is not None and plain.how == "prompt"
    assert oa({"messages": [*chat(text), {"role": "assistant", "content": text}], "model": "m"}) == plain
    anthropic = an({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]})
    assert anthropic is not None and anthropic.how == "prompt"
    # A string that ends in the key name (its opening quote escaped) and a top-level key that ends in it.
    tricky = {"messages": chat('say "prompt_cache_key'), 'say "prompt_cache_key': "not it", "z": 'x "metadata'}
    assert oa(tricky) == oa({"messages": chat('say "prompt_cache_key')})
    assert an({**tricky, "messages": [{"role": "user", "content": "hi"}]}) == an(
        {"messages": [{"role": "user", "content": "hi"}]}
    )


def test_a_nested_object_with_the_key_is_not_the_field() -> None:
    decoy = {"metadata": {"user_id": "someone else"}, "prompt_cache_key": "someone else"}
    tool_use = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Write", "input": decoy}]}
    tools = [{"name": "Write", "input_schema": {"type": "object", "properties": decoy}}]
    doc = {"messages": [{"role": "user", "content": "hi"}, tool_use], "tools": tools, "extra": [decoy, [decoy]]}
    by_prompt = an({"messages": [{"role": "user", "content": "hi"}]})
    assert an(doc) == by_prompt
    assert oa(doc) == oa({"messages": [{"role": "user", "content": "hi"}]})
    # With the real field present (before or after the decoys) it is the one taken.
    real = an({"messages": [{"role": "user", "content": "x"}], "metadata": {"user_id": SESSION}})
    assert an({**doc, "metadata": {"user_id": SESSION}}) == real
    assert an({"metadata": {"user_id": SESSION}, **doc}) == real
    assert oa({**doc, "prompt_cache_key": SESSION}) == oa({"messages": chat("x"), "prompt_cache_key": SESSION})


@pytest.mark.parametrize("where", ["first", "before messages", "after messages", "last"])
def test_the_id_field_is_found_anywhere_at_the_top(where: str) -> None:
    messages = chat("hi", "hello", "more")
    filler = {"model": "kimi-k2.6", "tools": [{"type": "function", "function": {"name": "t"}}], "stream": True}
    orders = {
        "first": {"prompt_cache_key": SESSION, "messages": messages, **filler},
        "before messages": {"model": "m", "prompt_cache_key": SESSION, "messages": messages, "stream": True},
        "after messages": {"messages": messages, "prompt_cache_key": SESSION, **filler},
        "last": {"messages": messages, **filler, "prompt_cache_key": SESSION},
    }
    expected = oa({"messages": chat("x"), "prompt_cache_key": SESSION})
    assert oa(orders[where]) == expected
    assert oa(orders[where], indent=2) == expected


@pytest.mark.parametrize("system_first", [True, False])
def test_an_anthropic_system_prompt_after_large_messages_is_found(system_first: bool) -> None:
    big = "x" * 300_000 + " 大 " * 50_000  # the walk's first window and the search's windows are both outgrown
    messages = [{"role": "user", "content": "hi " + big}, {"role": "assistant", "content": big}]
    system = [{"type": "text", "text": "S" * 200_000}]
    doc = {"system": system, "messages": messages} if system_first else {"messages": messages, "system": system}
    body = json.dumps({**doc, "max_tokens": 10}, ensure_ascii=False).encode()
    found = conversation("POST", AN, body, None)
    assert found is not None and found == affinity._identify(True, json.loads(body))
    assert found != an({"messages": messages})


def test_same_named_keys_nested_in_one_another_are_checked_within_a_budget() -> None:
    # Each nested "metadata" key's object holds the ones inside it, so checking every one would read the body again
    # and again; the search gives up after reading about twice the body, and the prompt's hash serves.
    nested: dict[str, Any] = {"x": "y" * 200_000}
    for _ in range(12):
        nested = {"metadata": nested}
    doc = {"messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": SESSION}, "tools": nested}
    body = json.dumps(doc).encode()
    spent: list[int] = []

    def counted(body: bytes, at: int, budget: int) -> tuple[dict[str, Any] | None, int]:
        fields, n = real(body, at, budget)
        spent.append(n)
        return fields, n

    real = affinity._rest_of_object
    with mock.patch.object(affinity, "_rest_of_object", counted):
        found = conversation("POST", AN, body, None)
    assert found is not None and found.how == "prompt"
    assert sum(spent) <= 3 * len(body)
    with mock.patch.object(affinity, "_TAIL_BUDGET", 100):
        assert conversation("POST", AN, body, None) == affinity._identify(True, doc)


def test_the_messages_after_the_first_user_message_are_not_read() -> None:
    # Documented: a body broken there still gets an identity (Kimi answers it with a 400, so the pin is harmless).
    body = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no end'
    assert conversation("POST", AN, body, None) == an({"messages": [{"role": "user", "content": "hi"}]})


# ---------------------------------------------------------------------------------------------------------------------
# The cheap reading agrees with json.loads
# ---------------------------------------------------------------------------------------------------------------------

_NAMES = ["prompt_cache_key", "metadata", "system", "messages", "user_id", "role", "content", "user", "k"]
_texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(_NAMES),
    st.sampled_from(['"prompt_cache_key": "x"', '{"metadata": {"user_id": "u"}}', 'say "system', "\\", '\\"', "大"]),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_NAMES) | _texts, inner, max_size=3),
    max_leaves=6,
)
_content = st.one_of(
    _texts,
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _texts},
                                   optional={"cache_control": st.just({"type": "ephemeral"}), "x": _json}), max_size=3),
    _json,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
    optional={"content": _content, "metadata": _json, "prompt_cache_key": _json, "extra": _json},
)
_document = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.lists(_message, max_size=5) | _json,
        "prompt_cache_key": st.sampled_from([SESSION, ""]) | _json,
        "metadata": st.fixed_dictionaries({}, optional={"user_id": _texts | _json, "x": _json}) | _json,
        "system": _content,
        "model": _json,
        "tools": _json,
    },
)


@st.composite
def _bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    doc = draw(_document)
    ordered = dict(draw(st.permutations(list(doc.items()))))
    layout: dict[str, Any] = draw(st.sampled_from([{}, {"indent": 2}, {"indent": 0}, {"separators": (",", ":")}]))
    body = json.dumps(ordered, ensure_ascii=draw(st.booleans()), **layout).encode()
    return body, ordered


@pytest.mark.parametrize("windows", ["default", "tiny"])
@settings(max_examples=400, deadline=None)
@given(drawn=_bodies(), anthropic=st.booleans())
def test_the_cheap_reading_finds_what_json_loads_finds(
    windows: str, drawn: tuple[bytes, dict[str, Any]], anthropic: bool
) -> None:
    body, _ = drawn
    # Past the documented limit (more same-named nested keys than the search tries) the prompt is hashed instead.
    needles = (b'"metadata"', b'"system"') if anthropic else (b'"prompt_cache_key"',)
    assume(all(body.count(n) <= affinity._MAX_CANDIDATES for n in needles))
    # Tiny windows make every read outgrow its window, and cut multi-byte characters.
    # The budget for nested same-named keys is another documented limit: lifted here.
    size = {"default": affinity._HEAD_WINDOW, "tiny": 3}[windows]
    with (
        mock.patch.object(affinity, "_HEAD_WINDOW", size),
        mock.patch.object(affinity, "_TAIL_WINDOW", size),
        mock.patch.object(affinity, "_TAIL_BUDGET", 10**6),
    ):
        found = conversation("POST", AN if anthropic else OA, body, None)
    assert found == affinity._identify(anthropic, json.loads(body))


_broken = st.one_of(
    st.binary(max_size=200),
    _bodies().flatmap(lambda d: st.integers(0, len(d[0])).map(lambda n: d[0][:n])),
    _bodies().flatmap(lambda d: st.tuples(st.integers(0, max(0, len(d[0]) - 1)), st.binary(min_size=1, max_size=3))
                      .map(lambda cut: d[0][: cut[0]] + cut[1] + d[0][cut[0] + 1 :])),
    st.integers(1, 20_000).map(lambda n: b'{"messages":' + b"[" * n),  # deeper than the parser's recursion limit
)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["POST", "GET", "post", ""]),
    path=st.sampled_from([OA, AN, "/v1/files", "", "?", "/messages?"]) | st.text(max_size=30),
    body=_broken,
    encoding=st.none() | st.sampled_from(["", "identity", "gzip"]) | st.text(max_size=8),
)
def test_conversation_never_raises(method: str, path: str, body: bytes, encoding: str | None) -> None:
    c = conversation(method, path, body, encoding)
    assert c is None or (c.how in ("prompt_cache_key", "metadata.user_id", "prompt") and len(c.id) == 16)


# ---------------------------------------------------------------------------------------------------------------------
# Pins
# ---------------------------------------------------------------------------------------------------------------------

A = (Surface.KIMI_CODE, "acct-a")
B = (Surface.KIMI_CODE, "acct-b")
T0 = 1_750_000_000.0


def test_a_pin_lives_until_its_conversation_is_idle_for_the_idle_time() -> None:
    pins = Pins(idle=60.0)
    assert pins.get("c1", T0) is None
    pins.pin("c1", A, 3, T0)
    assert pins.get("c1", T0 + 59.9) == Pin(A, 3, T0)
    pins.pin("c1", A, 3, T0 + 50)  # a request refreshes it; a look-up does not
    assert pins.get("c1", T0 + 109.9) == Pin(A, 3, T0 + 50)
    assert pins.get("c1", T0 + 110) is None
    assert len(pins) == 0 and pins.loads(T0 + 110) == {}


def test_the_default_idle_time_is_thirty_minutes() -> None:
    pins = Pins()
    pins.pin("c1", A, 1, T0)
    assert pins.get("c1", T0 + 29 * 60) is not None and pins.get("c1", T0 + 30 * 60) is None


def test_loads_count_live_pins_per_account() -> None:
    pins = Pins(idle=100.0)
    pins.pin("c1", A, 1, T0)
    pins.pin("c2", A, 2, T0 + 10)
    pins.pin("c3", B, 5, T0 + 20)
    assert pins.loads(T0 + 20) == {A: 2, B: 1}
    pins.pin("c1", B, 5, T0 + 30)  # c1 moved to the other account
    assert pins.loads(T0 + 30) == {A: 1, B: 2}
    assert pins.loads(T0 + 110) == {B: 2}  # c2 went idle
    view = pins.loads(T0 + 110)
    with pytest.raises(TypeError):
        view[A] = 1  # type: ignore[index]
    assert pins.loads(T0 + 130) == {}


def test_the_oldest_pin_makes_room_when_full() -> None:
    pins = Pins(idle=1000.0, max_pins=3)
    for i, t in enumerate((1.0, 2.0, 3.0)):
        pins.pin(f"c{i}", A, i, T0 + t)
    pins.pin("c0", B, 9, T0 + 4)  # c0 is the newest now, c1 the oldest
    pins.pin("c3", B, 9, T0 + 5)
    assert len(pins) == 3 and pins.get("c1", T0 + 5) is None
    assert [pins.get(c, T0 + 5) is not None for c in ("c0", "c2", "c3")] == [True, True, True]
    assert pins.loads(T0 + 5) == {A: 1, B: 2}


def test_forgetting_an_account_drops_its_pins() -> None:
    pins = Pins()
    pins.pin("c1", A, 1, T0)
    pins.pin("c2", B, 2, T0)
    pins.pin("c3", A, 1, T0)
    pins.forget_group(A)
    assert pins.get("c1", T0) is None and pins.get("c3", T0) is None and pins.get("c2", T0) == Pin(B, 2, T0)
    assert pins.loads(T0) == {B: 1} and len(pins) == 1
    pins.forget_group(A)  # nothing left to forget
    assert len(pins) == 1


@pytest.mark.parametrize(("idle", "max_pins"), [(0, 10), (-1, 10), (60, 0)])
def test_pins_need_a_positive_idle_time_and_size(idle: float, max_pins: int) -> None:
    with pytest.raises(ValueError):
        Pins(idle=idle, max_pins=max_pins)


_ops = st.lists(
    st.tuples(st.sampled_from(["pin", "get", "loads", "forget"]), st.integers(0, 6), st.sampled_from([A, B]),
              st.floats(0, 40)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=_ops)
def test_pins_agree_with_a_plain_model(ops: list[tuple[str, int, Any, float]]) -> None:
    """Every answer equals one worked out from scratch: the newest `max_pins` pins, minus those idle for `idle`."""
    pins = Pins(idle=30.0, max_pins=4)
    model: dict[str, Pin] = {}  # insertion order = order of last pin
    now = T0
    for op, n, group, step in ops:
        now += step
        conv = f"c{n}"

        def live(model: dict[str, Pin] = model, now: float = now) -> dict[str, Pin]:
            return {c: p for c, p in model.items() if now - p.last_seen < 30.0}

        if op == "pin":
            model.pop(conv, None)
            model[conv] = Pin(group, n, now)
            while len(model) > 4:
                del model[next(iter(model))]
            pins.pin(conv, group, n, now)
        elif op == "get":
            assert pins.get(conv, now) == live().get(conv)
        elif op == "loads":
            expected: dict[Any, int] = {}
            for p in live().values():
                expected[p.group] = expected.get(p.group, 0) + 1
            assert dict(pins.loads(now)) == expected
        else:
            for c in [c for c, p in model.items() if p.group == group]:
                del model[c]
            pins.forget_group(group)
        assert len(pins) >= len(live())


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def test_file_routes() -> None:
    assert file_route("POST", "/v1/files") == FileRoute("upload")
    assert file_route("post", "/v1/files/?purpose=x") == FileRoute("upload")
    assert file_route("GET", "/v1/files") is None  # the listing: any key of the account may list
    assert file_route("DELETE", "/v1/files") is None
    fid = "cn3ab8ve0t7jecb0hrrg"
    for method in ("GET", "DELETE", "POST"):
        assert file_route(method, f"/v1/files/{fid}") == FileRoute("owned", fid)
    assert file_route("GET", f"/v1/files/{fid}/content") == FileRoute("owned", fid)
    assert file_route("GET", f"/v1/files/{fid}/content?x=1") == FileRoute("owned", fid)
    assert file_route("GET", "/v1/files/a-b_C9/") == FileRoute("owned", "a-b_C9")
    not_files = [
        "/v1/files/", "/v1/files//content", "/v1/files/a.b", "/v1/files/a%2Fb", "/v1/files/../keys",
        "/v1/files/ab/other", "/v1/files/ab/content/x", f"/v1/files/{'a' * 129}", "/v1/filesx", "/v2/files/ab",
        "/coding/v1/files/ab", "/v1/files/ab\n", "/v1/files/é",
    ]
    for path in not_files:
        assert file_route("GET", path) is None, path
    assert file_route("GET", f"/v1/files/{'a' * 128}") == FileRoute("owned", "a" * 128)


def test_an_upload_answer_names_the_new_file(fake_kimi: Any) -> None:
    key = "sk-" + "F" * 44 + "0009"
    fake_kimi.add_key(key, account="files-a", name="f")
    fake_kimi.enable_files()
    with fake_kimi.client(timeout=5.0) as client:
        r = client.post("https://api.moonshot.cn/v1/files", headers={"Authorization": f"Bearer {key}"},
                        files={"file": ("notes.txt", b"hello", "text/plain")}, data={"purpose": "file-extract"})
    assert r.status_code == 200
    file_id = uploaded_file_id(r.status_code, r.content)
    assert file_id is not None and file_id == r.json()["id"] and fake_kimi.file_owner(file_id) == "files-a"
    assert file_route("GET", f"/v1/files/{file_id}/content") == FileRoute("owned", file_id)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"id": "file-abc_1", "object": "file", "bytes": 5}', "file-abc_1"),
        (201, b'{"id": "abc"}', "abc"),  # no "object": the id still tells
        (400, b'{"id": "abc", "object": "file"}', None),
        (500, b'{"error": {"type": "server_error"}}', None),
        (200, b'{"id": "abc", "object": "list"}', None),
        (200, b'{"id": "../x", "object": "file"}', None),
        (200, b'{"id": 5, "object": "file"}', None),
        (200, b'{"object": "file"}', None),
        (200, b'["abc"]', None),
        (200, b"not json", None),
        (200, b"", None),
        (200, b'{"id": "abc", "pad": "' + b"x" * 70_000 + b'"}', None),  # no file object is that large
    ],
)
def test_uploaded_file_id(status: int, body: bytes, expected: str | None) -> None:
    assert uploaded_file_id(status, body) == expected


@settings(max_examples=200, deadline=None)
@given(status=st.integers(0, 999), body=st.binary(max_size=100) | _json.map(lambda v: json.dumps(v).encode()))
def test_uploaded_file_id_never_raises(status: int, body: bytes) -> None:
    file_id = uploaded_file_id(status, body)
    assert file_id is None or re.fullmatch(r"[A-Za-z0-9_-]{1,128}", file_id)
