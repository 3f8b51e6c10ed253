"""What mitmproxy's flow views (mitmweb, the console, `-w` files, HAR exports) show of a Kimi request besides
the client's own flow: each failed attempt as a flow of its own, and a bounded copy of a streamed answer.

The real key never enters these flows either: an attempt's request is the client's, with the placeholder of the
key that attempt used.
"""

from __future__ import annotations

from collections.abc import Sequence

from mitmproxy import ctx, eventsequence, flow, http

from .failover import ATTEMPT_BODY_LIMIT, Attempt
from .routing import hide_credential

STREAM_COPY_LIMIT = 1 << 20  # what a streamed answer's flow keeps of its body


def _size(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


class StreamCopy:
    """A response's `stream` callable: passes every chunk on unchanged and keeps the first STREAM_COPY_LIMIT bytes.

    mitmproxy keeps nothing of a streamed body; with this the flow still shows the answer once it has ended.
    """

    __slots__ = ("cut", "data")

    def __init__(self) -> None:
        self.data = bytearray()
        self.cut = False

    def __call__(self, chunk: bytes) -> bytes:
        room = STREAM_COPY_LIMIT - len(self.data)
        if len(chunk) <= room:
            self.data += chunk
        else:
            self.data += chunk[:room]
            self.cut = True
        return chunk

    def note(self) -> str:
        return f" (stream copy cut at {_size(STREAM_COPY_LIMIT)})" if self.cut else ""


def short_id(f: flow.Flow) -> str:
    """The start of a flow's id: enough to tell a session's flows apart, and to search comments with `~comment`."""
    return f.id[:8]


def attempt_flows(client: http.HTTPFlow, attempts: Sequence[Attempt], total: int) -> list[http.HTTPFlow]:
    """One flow per failed attempt: the client's request as that attempt sent it, and what came back.

    `total` is how many attempts the request made (the last one is the client's own flow).
    """
    out = []
    for number, attempt in enumerate(attempts, 1):
        f = http.HTTPFlow(client.client_conn, client.server_conn)  # the same connections: the same client is shown
        f.request = client.request.copy()
        f.request.timestamp_start = f.request.timestamp_end = attempt.sent
        hide_credential(f.request.headers, attempt.fingerprint)
        cut = ""
        if attempt.status is not None:
            headers = http.Headers(list(attempt.headers))
            if attempt.body_cut:  # the start of the body is kept decoded
                headers.pop("content-encoding", None)
                cut = f" (body cut at {_size(ATTEMPT_BODY_LIMIT)})"
            f.response = http.Response(b"HTTP/1.1", attempt.status, attempt.reason, headers, attempt.body, None,
                                       attempt.answered, attempt.answered)
        if attempt.error:
            f.error = flow.Error(attempt.error, attempt.answered)
        f.comment = f"attempt {number} of {total} for flow {short_id(client)}: {attempt.summary}{cut}"
        out.append(f)
    return out


def link_note(client: http.HTTPFlow, shown: int, failed: int) -> str:
    """What the client flow's comment says of its attempt flows."""
    what = "its failed attempt is a flow of its own" if failed == 1 else "its failed attempts are flows of their own"
    more = f" (the first {shown} shown)" if shown < failed else ""
    return f" | flow {short_id(client)}: {what}{more}"


def keeps_flows() -> bool:
    """Whether the running master shows or saves flows: mitmweb and the console have a view, mitmdump its save
    addon (`-w`). `kimi-rotate proxy` has neither, so its requests pay nothing for attempt flows."""
    return any(name in ctx.master.addons.lookup for name in ("view", "save"))


async def add_flows(flows: Sequence[http.HTTPFlow]) -> None:
    """Pass finished flows through every addon's hooks, as mitmproxy does for flows it loads from a file: views
    list them, mitmdump prints them, `-w` and HAR exports save them."""
    for f in flows:
        for event in eventsequence.iterate(f):
            await ctx.master.addons.handle_lifecycle(event)
