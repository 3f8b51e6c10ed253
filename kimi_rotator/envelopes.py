"""Errors the proxy answers by itself, in the envelope the client's SDK parses."""

from __future__ import annotations

import json
import math

from mitmproxy import http

# Anthropic's SDKs and Claude Code read {"type":"error","error":{...}}; OpenAI-style clients {"error":{...}}.
_ANTHROPIC_TYPES = {403: "permission_error", 429: "rate_limit_error", 502: "api_error", 503: "overloaded_error",
                    504: "api_error"}
_OPENAI_TYPES = {403: "permission_denied_error", 429: "rate_limit_reached_error", 502: "server_error",
                 503: "server_unavailable", 504: "server_error"}
LOCAL_HEADER = "x-kimi-rotate"
INTERNAL_ERROR = "kimi-rotate hit an internal error on this request (the proxy's log has the details); please report it"


def is_anthropic_route(path: str) -> bool:
    route = path.split("?", 1)[0].rstrip("/")
    return route.endswith("/messages") or "/messages/" in route


def error_body(status: int, message: str, path: str) -> bytes:
    if is_anthropic_route(path):
        doc: dict[str, object] = {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
        }
    else:
        doc = {"error": {"type": _OPENAI_TYPES.get(status, "server_error"), "message": message, "code": status}}
    return json.dumps(doc).encode()


def local_headers(retry_after: float | None = None) -> dict[str, str]:
    headers = {"content-type": "application/json", LOCAL_HEADER: "local"}
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        # Clients that cap their own wait (the OpenAI SDK stops at 120 s) should still not hammer us.
        headers["x-should-retry"] = "true" if retry_after <= 120 else "false"
    return headers


def error_response(status: int, message: str, path: str, retry_after: float | None = None) -> http.Response:
    return http.Response.make(status, error_body(status, message, path), local_headers(retry_after))
