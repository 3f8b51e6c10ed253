"""Runs requests with the official openai or anthropic Python SDK and prints each outcome as one JSON line.

Run by tests/test_e2e_sdk.py in a separate interpreter (the SDKs need h11 >= 0.16, mitmproxy 11.0.2 pins h11 <= 0.14).
It uses nothing of this repository. The proxy comes from the environment, as for any program behind a system-wide
proxy: HTTPS_PROXY, and SSL_CERT_FILE for mitmproxy's CA (httpx, under both SDKs, reads both). A request with
"explicit" builds the SDK's http client with --proxy and --ca instead.

    python sdk_client.py openai|anthropic --base-url URL --model M --plan '[{"stream": true, "headers": {}}, ...]'

The requests of the plan run one after the other (importing an SDK takes seconds; a plan pays it once). Output per
request: {"ok": true, "text": ..., "events": [{"t": s, "type": ..., "text": ...}], "elapsed": s} or
{"ok": false, "error": <exception class>, "status": int, "body": ..., "headers": {...}}.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
from typing import Any


def _http_client(module: Any, args: argparse.Namespace, explicit: bool) -> Any:
    if not explicit:
        return None
    verify = ssl.create_default_context(cafile=args.ca)
    return module.DefaultHttpxClient(proxy=args.proxy, verify=verify, trust_env=False)


def run_openai(args: argparse.Namespace, stream: bool, headers: dict[str, str], explicit: bool) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=args.max_retries,
                           timeout=args.timeout, http_client=_http_client(openai, args, explicit))
    messages = [{"role": "user", "content": "hi"}]
    t0 = time.monotonic()
    try:
        if not stream:
            done = client.chat.completions.create(model=args.model, messages=messages, extra_headers=headers)
            return {"ok": True, "text": done.choices[0].message.content, "events": [],
                    "elapsed": time.monotonic() - t0}
        events = []
        for chunk in client.chat.completions.create(model=args.model, messages=messages, stream=True,
                                                    extra_headers=headers):
            text = (chunk.choices[0].delta.content or "") if chunk.choices else ""
            events.append({"t": time.monotonic() - t0, "type": "chunk", "text": text})
        return {"ok": True, "text": "".join(e["text"] for e in events), "events": events,
                "elapsed": time.monotonic() - t0}
    except openai.APIStatusError as e:
        return {"ok": False, "error": type(e).__name__, "status": e.status_code, "body": e.body,
                "headers": dict(e.response.headers)}


def run_anthropic(args: argparse.Namespace, stream: bool, headers: dict[str, str], explicit: bool
                  ) -> dict[str, Any]:
    import anthropic

    client = anthropic.Anthropic(base_url=args.base_url, api_key=args.api_key, max_retries=args.max_retries,
                                 timeout=args.timeout, http_client=_http_client(anthropic, args, explicit))
    messages = [{"role": "user", "content": "hi"}]
    t0 = time.monotonic()
    try:
        if not stream:
            done = client.messages.create(model=args.model, max_tokens=64, messages=messages, extra_headers=headers)
            return {"ok": True, "text": "".join(b.text for b in done.content if b.type == "text"), "events": [],
                    "elapsed": time.monotonic() - t0}
        events = []
        for event in client.messages.create(model=args.model, max_tokens=64, messages=messages, stream=True,
                                            extra_headers=headers):
            text = event.delta.text if event.type == "content_block_delta" and event.delta.type == "text_delta" else ""
            events.append({"t": time.monotonic() - t0, "type": event.type, "text": text})
        return {"ok": True, "text": "".join(e["text"] for e in events), "events": events,
                "elapsed": time.monotonic() - t0}
    except anthropic.APIStatusError as e:
        return {"ok": False, "error": type(e).__name__, "status": e.status_code, "body": e.body,
                "headers": dict(e.response.headers)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("sdk", choices=["openai", "anthropic"])
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default="sk-placeholder-from-client")
    p.add_argument("--plan", default='[{}]', help='JSON list of {"stream": bool, "headers": {}, "explicit": bool}')
    p.add_argument("--max-retries", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--proxy", help="proxy URL for explicit requests (others use HTTPS_PROXY)")
    p.add_argument("--ca", help="CA file explicit requests trust (others use SSL_CERT_FILE)")
    args = p.parse_args()
    run = run_openai if args.sdk == "openai" else run_anthropic
    for step in json.loads(args.plan):
        result = run(args, bool(step.get("stream")), dict(step.get("headers") or {}), bool(step.get("explicit")))
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
