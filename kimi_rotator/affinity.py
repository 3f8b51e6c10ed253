"""Conversation and file affinity: which requests belong on the account that served them before.

Kimi's context cache is per account, so a conversation that stays on one account keeps its cache hits; a file id
belongs to the account that uploaded it. This module only recognises those requests and remembers the pins: pure,
no I/O, no mitmproxy, time passed in. The engine decides whether a pinned account may still serve.

`conversation` runs on the event loop for every inference request, whose bodies coding agents grow to 100 KB–2 MB,
so it does not parse the whole body (benchmarks/bench_affinity.py: json.loads of a 1 MB body costs milliseconds).
It reads the top-level object from the start up to the first user message, and finds the fields that usually come
after `messages` (prompt_cache_key, metadata, Anthropic's system) by searching the body from its end for the key,
taking an occurrence only when the text from it to the end of the body parses as the rest of the top-level object:
a key of a nested object (a tool's input) ends its object before the body ends, and a key name inside message text
is escaped, so neither is taken. For valid JSON this finds what json.loads finds, with exceptions that cost only the
pin (the prompt's hash serves instead): a top-level key spelt with \\u escapes, and one hidden behind more than
_MAX_CANDIDATES nested keys of the same name, or behind same-named keys nested so deep that checking them would read
more than _TAIL_BUDGET times the text. The part of `messages` after the first user message is not read, so a
body broken there still gets an identity; Kimi rejects such a body anyway.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from .models import Group

How = Literal["prompt_cache_key", "metadata.user_id", "prompt"]


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation's identity. `id` is a short hash, never the session id or prompt text: safe to log."""

    id: str
    how: How


# ---------------------------------------------------------------------------------------------------------------------
# Which conversation a request belongs to
# ---------------------------------------------------------------------------------------------------------------------

_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")
_WS_BYTES = re.compile(rb"[ \t\n\r]*")
_FIELDS = ("prompt_cache_key", "metadata", "system")  # the top-level fields besides `messages` that are read
_HEAD_WINDOW = 16 * 1024  # bytes decoded first for the walk from the start (then 4 times as many, and so on)
_TAIL_WINDOW = 16 * 1024  # likewise for the text after a key found from the end
_MAX_CANDIDATES = 16  # occurrences of a key name tried from the end (a tool schema may name a "metadata" property)
# Bytes those tries may read together, in multiples of the text searched: finding a real field reads the text after
# it about once, but same-named keys nested in one another would each read the rest of their object.
_TAIL_BUDGET = 2
_MAX_KEY_INDENT = 256  # whitespace before a top-level key (pretty-printed bodies indent it a little)


def conversation(method: str, path: str, body: bytes, content_encoding: str | None) -> Conversation | None:
    """The conversation an inference request belongs to (None: not an inference request, or nothing to know it by).

    Precedence: OpenAI Chat Completions' `prompt_cache_key` (kimi-cli sends its session id), Anthropic Messages'
    `metadata.user_id` (Claude Code's carries its session id), else a hash of the system prompt and the first user
    message. Never raises.
    """
    anthropic = _inference_format(method, path)
    if anthropic is None or (content_encoding or "").strip().lower() not in ("", "identity"):
        return None  # a compressed body is not decompressed on the event loop for this
    try:
        return _conversation(body, anthropic)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep to parse
        return None


def _inference_format(method: str, path: str) -> bool | None:
    """True for Anthropic Messages, False for OpenAI Chat Completions, None for any other request."""
    if method.upper() != "POST":
        return None
    route = path.split("?", 1)[0]
    if route.endswith("/chat/completions"):
        return False
    if route.endswith("/messages"):
        return True
    return None


def _conversation(body: bytes, anthropic: bool) -> Conversation | None:
    head = _read_head(body, anthropic)
    if head is None:
        return None
    fields, stop = head
    if stop is None or _by_source(anthropic, fields) is not None:
        return _identify(anthropic, fields)
    # The walk stopped at the first user message: the fields not met so far can only come after `messages`.
    for key in ("metadata", "system") if anthropic else ("prompt_cache_key",):
        if key in fields or _by_source(anthropic, fields) is not None:
            continue
        tail = _tail_fields(body, key, stop)
        if tail is not None:
            fields.update((k, tail[k]) for k in _FIELDS if k in tail)
    return _identify(anthropic, fields)


def _read_head(body: bytes, anthropic: bool) -> tuple[dict[str, Any], int | None] | None:
    """The top-level fields read from the start, and the byte offset where the walk stopped (None: it read the
    whole object). A walk that runs off the end of the decoded window starts again on a window four times larger."""
    size = _HEAD_WINDOW
    while True:
        end = _char_boundary(body, size)
        text = body[:end].decode("utf-8")
        try:
            fields, stop = _walk(text, anthropic)
        except ValueError:
            if end >= len(body):
                return None
            size *= 4
            continue
        return fields, (None if stop is None else len(text[:stop].encode("utf-8")))


def _walk(text: str, anthropic: bool) -> tuple[dict[str, Any], int | None]:
    """Read the top-level object: the fields in _FIELDS, and `messages` up to its first user message.

    Returns where it stopped (None: at the end of the object). It stops at the first user message, or as soon as
    the conversation's own id is known. Every value read is followed by a delimiter checked here, so a window that
    ends inside a value raises ValueError rather than yielding part of it.
    """
    fields: dict[str, Any] = {}
    i = _skip_ws(text, 0)
    if text[i : i + 1] != "{":
        raise ValueError("not an object")
    i = _skip_ws(text, i + 1)
    if text[i : i + 1] == "}":
        return fields, None
    while True:
        if text[i : i + 1] != '"':
            raise ValueError("expected a key")
        key, i = _DECODER.raw_decode(text, i)
        i = _skip_ws(text, i)
        if text[i : i + 1] != ":":
            raise ValueError("expected ':'")
        i = _skip_ws(text, i + 1)
        if key == "messages" and text[i : i + 1] == "[":
            messages, i, complete = _messages_head(text, i)
            fields["messages"] = messages
            if not complete:
                return fields, i
        else:
            value, i = _DECODER.raw_decode(text, i)
            if key in _FIELDS or key == "messages":
                fields[key] = value
        i = _skip_ws(text, i)
        delimiter = text[i : i + 1]
        if delimiter == "}":
            return fields, None
        if delimiter != ",":
            raise ValueError("expected ',' or '}'")
        if key in _FIELDS and _by_source(anthropic, fields) is not None:
            return fields, i
        i = _skip_ws(text, i + 1)


def _messages_head(text: str, i: int) -> tuple[list[Any], int, bool]:
    """The messages from the array at `i` up to and including the first user message, where they end, and
    whether that was the end of the array (no user message)."""
    messages: list[Any] = []
    i = _skip_ws(text, i + 1)
    if text[i : i + 1] == "]":
        return messages, i + 1, True
    while True:
        message, i = _DECODER.raw_decode(text, i)
        messages.append(message)
        if isinstance(message, dict) and message.get("role") == "user":
            return messages, i, False
        i = _skip_ws(text, i)
        delimiter = text[i : i + 1]
        if delimiter == "]":
            return messages, i + 1, True
        if delimiter != ",":
            raise ValueError("expected ',' or ']'")
        i = _skip_ws(text, i + 1)


def _tail_fields(body: bytes, key: str, lo: int) -> dict[str, Any] | None:
    """The top-level fields from the last top-level occurrence of `key` after byte `lo` to the end of the body."""
    needle = b'"' + key.encode() + b'"'
    hi = len(body)
    budget = _TAIL_BUDGET * (len(body) - lo) + _TAIL_WINDOW
    for _ in range(_MAX_CANDIDATES):
        at = body.rfind(needle, lo, hi)
        if at < 0 or budget <= 0:
            return None
        hi = at
        before = body[max(0, at - _MAX_KEY_INDENT) : at].rstrip(b" \t\n\r")[-1:]
        after = _skip_ws_bytes(body, at + len(needle))
        if before not in (b",", b"{") or body[after : after + 1] != b":":
            continue  # a string value, or text inside a string: a key follows '{' or ',' and comes before ':'
        fields, spent = _rest_of_object(body, at, budget)
        if fields is not None:
            return fields
        budget -= spent
    return None


def _rest_of_object(body: bytes, at: int, budget: int) -> tuple[dict[str, Any] | None, int]:
    """The key/value pairs from the key at `at` on, if they close an object exactly at the end of the body; and how
    many bytes were read to find out (it stops once they reach `budget`)."""
    size = _TAIL_WINDOW
    spent = 0
    while True:
        end = _char_boundary(body, at + size)
        spent += end - at
        try:
            text = "{" + body[at:end].decode("utf-8")
        except UnicodeDecodeError:
            return None, spent
        try:
            fields, stop = _DECODER.raw_decode(text)
        except ValueError:
            if end >= len(body) or spent >= budget:
                return None, spent
            size *= 4
            continue
        # The object closed; it is the top-level one only if nothing but whitespace follows, here and beyond.
        if _skip_ws(text, stop) != len(text) or _skip_ws_bytes(body, end) != len(body):
            return None, spent
        return (fields if isinstance(fields, dict) else None), spent


def _skip_ws(text: str, i: int) -> int:
    """The index of the first character at or after `i` that is not JSON whitespace."""
    match = _WS.match(text, i)
    return match.end() if match else i


def _skip_ws_bytes(body: bytes, i: int) -> int:
    match = _WS_BYTES.match(body, i)
    return match.end() if match else i


def _char_boundary(body: bytes, end: int) -> int:
    """`end`, moved back to the start of the UTF-8 character it falls in, so that body[:end] decodes."""
    end = min(end, len(body))
    for _ in range(3):
        if end >= len(body) or not 0x80 <= body[end] < 0xC0:
            break
        end -= 1
    return end


def _by_source(anthropic: bool, fields: Mapping[str, Any]) -> Conversation | None:
    """The conversation by the id its client sent (None: none sent)."""
    if anthropic:
        metadata = fields.get("metadata")
        user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
        return _hashed("metadata.user_id", user_id) if isinstance(user_id, str) and user_id else None
    key = fields.get("prompt_cache_key")
    return _hashed("prompt_cache_key", key) if isinstance(key, str) and key else None


def _identify(anthropic: bool, fields: Mapping[str, Any]) -> Conversation | None:
    """The conversation of a request whose top-level fields are `fields` (`messages` may hold only the messages up
    to the first user message)."""
    by_source = _by_source(anthropic, fields)
    if by_source is not None:
        return by_source
    messages = fields.get("messages")
    if not isinstance(messages, list):
        return None
    users = (m for m in messages if isinstance(m, dict) and m.get("role") == "user")
    first_user = next(users, None)
    if first_user is None:
        return None
    system: Any
    if anthropic:
        system = _canonical_content(fields.get("system"))
    else:
        system = []
        for m in messages:
            if not (isinstance(m, dict) and m.get("role") in ("system", "developer")):
                break
            system.append([m["role"], _canonical_content(m.get("content"))])
    prompt = [system, _canonical_content(first_user.get("content"))]
    return _hashed("prompt", json.dumps(prompt, sort_keys=True, ensure_ascii=True, separators=(",", ":")))


def _canonical_content(content: Any) -> Any:
    """Message content in one form: a string is a list of one text part, and parts lose `cache_control` (Claude Code
    marks the newest message with it, so the first user message carries it only while it is the newest)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [{k: v for k, v in p.items() if k != "cache_control"} if isinstance(p, dict) else p for p in content]
    return content


def _hashed(how: How, value: str) -> Conversation:
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8, person=how.encode()[:16])
    return Conversation(digest.hexdigest(), how)


# ---------------------------------------------------------------------------------------------------------------------
# Which account a conversation is pinned to
# ---------------------------------------------------------------------------------------------------------------------

# Kimi does not say how long its context cache keeps an idle prefix. Other vendors' automatic prompt caches keep one
# for 5 to 60 minutes. A pin that outlives the cache costs little: it is honoured only while its account is
# eligible and under its caps, and the conversation lands on an account that is as good as any other. A pin that
# expires too early costs cache hits after every pause a person takes in an agent session (reading a diff, a
# meeting). But live pins are also the load by which new conversations are spread, and an idle time much longer
# than a working pause counts finished conversations as load. 30 minutes covers the pauses and keeps the count
# close to the conversations that are going on.
DEFAULT_IDLE = 30 * 60.0
DEFAULT_MAX_PINS = 100_000  # some 25 MB at most; far more conversations than one proxy sees in an idle time


@dataclass(frozen=True, slots=True)
class Pin:
    group: Group
    key_id: int
    last_seen: float


class Pins:
    """Conversation id -> the account and key that served it last, forgotten after `idle` seconds without a request.

    Entries are kept in order of last use, so expiry and the size bound drop from the old end and every call costs
    O(1) amortised; the live pins per account are counted as they come and go. `now` is expected not to go
    backwards (an entry pinned "later" with an earlier time only expires late).
    """

    def __init__(self, idle: float = DEFAULT_IDLE, max_pins: int = DEFAULT_MAX_PINS) -> None:
        if idle <= 0 or max_pins <= 0:
            raise ValueError("idle and max_pins must be positive")
        self.idle = idle
        self.max_pins = max_pins
        self._pins: OrderedDict[str, Pin] = OrderedDict()
        self._loads: dict[Group, int] = {}

    def __len__(self) -> int:
        return len(self._pins)

    def get(self, conversation_id: str, now: float) -> Pin | None:
        """The live pin of a conversation (None: never pinned, or idle for `idle` seconds or more)."""
        self._expire(now)
        pin = self._pins.get(conversation_id)
        return pin if pin is not None and now - pin.last_seen < self.idle else None

    def pin(self, conversation_id: str, group: Group, key_id: int, now: float) -> None:
        """Record that `key_id` of `group` serves the conversation now (a new pin, a refreshed one, or a move)."""
        self._expire(now)
        old = self._pins.pop(conversation_id, None)
        if old is not None:
            self._count(old.group, -1)
        self._pins[conversation_id] = Pin(group, key_id, now)
        self._count(group, +1)
        while len(self._pins) > self.max_pins:
            self._drop_oldest()

    def loads(self, now: float) -> Mapping[Group, int]:
        """Live pins per account (accounts with none are absent). A read-only view that later calls change."""
        self._expire(now)
        return MappingProxyType(self._loads)

    def retain_keys(self, key_ids: Collection[int]) -> None:
        """Drop every pin to a key not in `key_ids` (keys removed from the pool). O(pins)."""
        for conversation_id in [c for c, p in self._pins.items() if p.key_id not in key_ids]:
            self._count(self._pins.pop(conversation_id).group, -1)

    def forget_group(self, group: Group) -> None:
        """Drop every pin to `group` (its account was removed). O(pins)."""
        for conversation_id in [c for c, p in self._pins.items() if p.group == group]:
            del self._pins[conversation_id]
        self._loads.pop(group, None)

    def _expire(self, now: float) -> None:
        while self._pins:
            oldest = next(iter(self._pins.values()))
            if now - oldest.last_seen < self.idle:
                return
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, pin = self._pins.popitem(last=False)
        self._count(pin.group, -1)

    def _count(self, group: Group, delta: int) -> None:
        n = self._loads.get(group, 0) + delta
        if n > 0:
            self._loads[group] = n
        else:
            self._loads.pop(group, None)


# ---------------------------------------------------------------------------------------------------------------------
# Which account a file belongs to
# ---------------------------------------------------------------------------------------------------------------------

_FILES = "/v1/files"
_OWNED = re.compile(r"/v1/files/([A-Za-z0-9_-]{1,128})(?:/content)?/?")
_FILE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_MAX_UPLOAD_ANSWER = 64 * 1024  # a file object is a few hundred bytes


@dataclass(frozen=True, slots=True)
class FileRoute:
    """An upload (its answer names the new file's id) or a request for one file (`file_id`)."""

    kind: Literal["upload", "owned"]
    file_id: str | None = None


def file_route(method: str, path: str) -> FileRoute | None:
    """`POST /v1/files` is an upload; any request to `/v1/files/{id}` or `/v1/files/{id}/content` needs the
    account that owns the file. None for every other request (listing files included: any key may list)."""
    route = path.split("?", 1)[0]
    if route in (_FILES, _FILES + "/"):
        return FileRoute("upload") if method.upper() == "POST" else None
    owned = _OWNED.fullmatch(route)
    return FileRoute("owned", owned.group(1)) if owned else None


def uploaded_file_id(status: int, body: bytes) -> str | None:
    """The id in a successful upload's answer (Moonshot's file object, {"id": "...", "object": "file", ...}), from
    the body as decoded for content-encoding. None: a failed upload, or an answer that names no valid id."""
    if not 200 <= status < 300 or len(body) > _MAX_UPLOAD_ANSWER:
        return None
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(answer, dict) or answer.get("object", "file") != "file":
        return None
    file_id = answer.get("id")
    return file_id if isinstance(file_id, str) and _FILE_ID.fullmatch(file_id) else None


def is_inference(method: str, path: str) -> bool:
    """A model call (Chat Completions or Messages): the requests Kimi's per-account caps count."""
    return _inference_format(method, path) is not None
