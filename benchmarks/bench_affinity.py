"""What recognising a request's conversation costs on the event loop (kimi_rotator/affinity.py).

Run: python benchmarks/bench_affinity.py [--sizes 1,100,1000]   (sizes in KB; about 20 s; prints one table)

Bodies are built the way the agents send them, as UTF-8 with some non-ASCII text (as httpx and JSON.stringify
write it), to about each size:
  openai     kimi-cli style: messages first (system, user, then tool calls and tool results), prompt_cache_key,
             tools after them
  anthropic  Claude Code style: model, messages, then system blocks, tools, metadata.user_id
  ... no id  the same without prompt_cache_key / metadata, so the system prompt and first user message are hashed
             (for Anthropic the system prompt then has to be found after the messages)
Columns, µs per call (median of 5 timeit repeats):
  json.loads   parsing the whole body and reading the fields from it: what a plain implementation costs
  conversation what affinity.conversation costs
  ratio        json.loads / conversation
"""

from __future__ import annotations

import argparse
import json
import statistics
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

from kimi_rotator.affinity import Pins, _identify, conversation
from kimi_rotator.models import Surface

_CODE = "\n".join(
    f'    def handle_{i}(self, request):\n        """处理请求 {i}: parse "{{key}}" \\ and reply."""\n'
    f"        return self.reply(request, status={200 + i % 5})"
    for i in range(40)
)  # a file an agent read: quotes, backslashes, newlines and some Chinese, about 4 KB
_SYSTEM = "You are a coding agent. Follow the rules below.\n" + "- Keep changes small and tested. 保持简洁。\n" * 150
_TOOLS = [
    {"name": f"tool_{i}", "description": "Does one thing. " * 20,
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}, "metadata": {"type": "object"}}}}
    for i in range(12)
]


def openai_body(size: int, with_id: bool = True) -> bytes:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": _SYSTEM[: max(200, size // 8)]},
        {"role": "user", "content": "Fix the failing test in handlers.py. 谢谢"},
    ]
    doc: dict[str, Any] = {"messages": messages, "model": "kimi-for-coding"}
    if with_id:
        doc["prompt_cache_key"] = "8f14e45f-ceea-467e-a4b2-9e5d0c3f1a2b"
    doc |= {"stream": True, "tools": [{"type": "function", "function": t} for t in _TOOLS[: 1 + size // 20_000]]}
    _grow(doc, size, lambda n: [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": f"call_{n}", "type": "function",
             "function": {"name": "read", "arguments": json.dumps({"path": f"src/h{n}.py"})}}]},
        {"role": "tool", "tool_call_id": f"call_{n}", "content": _CODE},
    ])
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def anthropic_body(size: int, with_id: bool = True) -> bytes:
    first = [
        {"type": "text", "text": "<system-reminder>Today is 2026-06-01.</system-reminder>"},
        {"type": "text", "text": "Fix the failing test in handlers.py. 谢谢", "cache_control": {"type": "ephemeral"}},
    ]
    doc: dict[str, Any] = {"model": "kimi-for-coding", "messages": [{"role": "user", "content": first}]}
    doc["system"] = [{"type": "text", "text": "You are Claude Code."},
                     {"type": "text", "text": _SYSTEM[: max(200, size // 8)], "cache_control": {"type": "ephemeral"}}]
    doc["tools"] = _TOOLS[: 1 + size // 20_000]
    if with_id:
        doc["metadata"] = {"user_id": "user_ab12_account__session_8f14e45f-ceea-467e-a4b2-9e5d0c3f1a2b"}
    doc |= {"max_tokens": 32000, "stream": True}
    _grow(doc, size, lambda n: [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": f"toolu_{n}", "name": "Read", "input": {"file_path": f"src/h{n}.py"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{n}", "content": _CODE}]},
    ])
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _grow(doc: dict[str, Any], size: int, turn: Callable[[int], list[dict[str, Any]]]) -> None:
    """Append tool-call turns to doc["messages"] until the body is about `size` bytes."""
    n = 0
    while len(json.dumps(doc, ensure_ascii=False).encode()) < size - 2_500:
        doc["messages"].extend(turn(n))
        n += 1


def per_call_us(fn: Callable[[], object]) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(1, number // 4)  # autorange aims at 0.2 s; a quarter is enough per repeat
    return statistics.median(timer.repeat(5, number)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,100,1000", help="body sizes in KB (default 1,100,1000)")
    sizes = [int(float(s) * 1000) for s in parser.parse_args().sizes.split(",")]

    cases = [("openai", "/v1/chat/completions", openai_body), ("anthropic", "/v1/messages", anthropic_body)]
    print(f"{'body':<22}{'bytes':>10}{'how':>18}{'json.loads':>14}{'conversation':>14}{'ratio':>8}")
    for name, path, build in cases:
        anthropic = path.endswith("/messages")
        for with_id in (True, False):
            for size in sizes:
                body = build(size, with_id)
                found = conversation("POST", path, body, None)
                full = _identify(anthropic, json.loads(body))
                assert found == full, (name, size, found, full)  # the cheap way must give json.loads' answer
                plain = per_call_us(partial(lambda b, a: _identify(a, json.loads(b)), body, anthropic))
                cheap = per_call_us(partial(conversation, "POST", path, body, None))
                label = name + ("" if with_id else ", no id")
                how = found.how if found else "-"
                print(f"{label:<22}{len(body):>10,}{how:>18}{plain:>14.1f}{cheap:>14.1f}{plain / cheap:>8.1f}")

    pins = Pins(max_pins=100_000)
    groups = [(Surface.KIMI_CODE, f"acct-{i}") for i in range(8)]
    for i in range(100_000):
        pins.pin(f"c{i}", groups[i % 8], i % 8, float(i) * 0.01)
    now = 1000.0
    print(f"\nPins with 100,000 entries (µs per call): pin {per_call_us(lambda: pins.pin('c5', groups[5], 5, now)):.2f}"
          f", get {per_call_us(lambda: pins.get('c5', now)):.2f}, loads {per_call_us(lambda: pins.loads(now)):.2f}")


if __name__ == "__main__":
    main()
