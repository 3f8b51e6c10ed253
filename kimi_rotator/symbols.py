"""The symbols the CLI prints, and plain stand-ins for output that cannot encode them.

Windows' redirected output is cp1252, and some terminals are ASCII: printing ● or 📊 there raised
UnicodeEncodeError. `symbols()` decides once per process, from the encodings of stdout and stderr.
"""

from __future__ import annotations

import codecs
import functools
import io
import sys
from dataclasses import astuple, dataclass


@dataclass(frozen=True)
class Symbols:
    current: str  # the key in use (list-keys)
    other: str
    ok: str
    failed: str
    cooling: str
    full: str  # health bar
    empty: str
    stats: str  # heading prefixes in `stats`
    totals: str
    rule: str  # a horizontal line's character
    arrow: str  # before → after
    ellipsis: str  # in masked keys
    bars: str  # `stats --plot`: a bar's heights, from none to full
    marks: str  # `stats --plot`: below a bar, no 429s / some / 10% or more of its requests


FANCY = Symbols("●", "○", "✓", "✗", "⏱", "█", "░", "📊 ", "📈 ", "─", "→", "…", " ▁▂▃▄▅▆▇█", " ·!")
PLAIN = Symbols("*", "-", "+", "x", "~", "#", ".", "", "", "-", "->", "...", " .:-=+*#@", " .!")


@functools.cache
def symbols() -> Symbols:
    """FANCY when both stdout and stderr can encode all of it, else PLAIN. With PLAIN, the streams also replace
    anything else they cannot encode (a key's name, say) with `?` instead of failing."""
    streams = [s for s in (sys.stdout, sys.stderr) if s is not None]
    if all(_encodes(s, "".join(astuple(FANCY))) for s in streams):
        return FANCY
    for s in streams:
        if isinstance(s, io.TextIOWrapper):
            s.reconfigure(errors="replace")
    return PLAIN


def _encodes(stream: object, text: str) -> bool:
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        codecs.encode(text, encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True
