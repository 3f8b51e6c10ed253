"""Reading `add-keys` input: one `KEY [NAME]` a line, every line checked before anything is added.

Blank lines and lines starting with `#` are skipped; the name is the rest of the line (it may hold
spaces). Problems are reported by line number with the key masked, never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .keys import KeyFormatError, PastedHeader, default_surface, mask, validate_key, validate_name
from .models import Surface
from .store import Conflict, NewKey, Where

MAX_BYTES = 4 * 1024 * 1024  # about 40,000 lines: far above any pool, stops a wrong file from eating memory


class BulkError(Exception):
    """The input can't be read; the message says why and what to do."""


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, as an editor shows it
    key: NewKey


@dataclass(frozen=True)
class LineError:
    number: int
    problem: str


def parse(text: str, surface: Surface | None, account: str | None) -> tuple[list[Line], list[LineError]]:
    """The keys of `text` and the problems of its bad lines. `surface` (default: by each key's prefix) and
    `account` apply to every key. A key or a name given twice is the store's to find, as it finds one already
    in the pool (`Store.conflicts`, `on_lines`)."""
    lines: list[Line] = []
    errors: list[LineError] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        token, _, rest = line.replace("\t", " ").partition(" ")
        rest = rest.strip()
        chosen = surface or default_surface(token)
        try:
            secret = validate_key(token if not _is_header_word(token) else line, chosen)
        except PastedHeader as e:
            errors.append(LineError(number, f"invalid key: {e}"))
            continue
        except KeyFormatError as e:
            errors.append(LineError(number, f"invalid key {mask(token)}: {e}"))
            continue
        try:
            name = validate_name(rest) if rest else None
        except KeyFormatError as e:
            errors.append(LineError(number, f"invalid name for {mask(secret)}: {e}"))
            continue
        lines.append(Line(number, NewKey(secret=secret, name=name, surface=chosen, account=account)))
    return lines, errors


def on_lines(lines: list[Line]) -> Where:
    """Names an earlier key of the batch of `lines` in the store's messages by its line: `on line 2`."""
    return lambda position: f"on line {lines[position].number}"


def line_errors(lines: list[Line], conflicts: list[Conflict]) -> list[LineError]:
    """The store's clashes (by position in the batch of `lines`) as line problems."""
    return [LineError(lines[c.position].number, c.problem) for c in conflicts]


def _is_header_word(token: str) -> bool:
    """`Bearer sk-…` or `Authorization: …` copied from a header: judge the whole line, which says so."""
    return token.lower() in ("bearer", "authorization:", "x-api-key:")


def read_file(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_BYTES:
            raise BulkError(f"{path} is far too large to be a list of keys; is it the right file?")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BulkError(f"{path} does not exist; check the file name") from None
    except IsADirectoryError:
        raise BulkError(f"{path} is a folder; pass a file with one `KEY [NAME]` a line") from None
    except OSError as e:
        raise BulkError(f"cannot read {path}: {e.strerror}; check its permissions") from None
    try:
        return raw.decode("utf-8-sig")  # a BOM, as some Windows editors write, is not part of the first key
    except UnicodeDecodeError:
        raise BulkError(f"{path} is not UTF-8 text; save it as UTF-8 (or plain ASCII) and try again") from None


def read_stdin(stdin: TextIO | None) -> str:
    if stdin is None or stdin.closed:
        raise BulkError("no input on stdin; pass FILE, or pipe one `KEY [NAME]` a line")
    text = stdin.read(MAX_BYTES + 1)
    if len(text) > MAX_BYTES:
        raise BulkError("stdin is far too large to be a list of keys; is it the right input?")
    return text.removeprefix("\ufeff")
