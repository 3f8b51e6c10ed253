"""How `kimi-rotate` help and usage errors read.

Help: plain text that fits the terminal, 80 columns or 40. Click formats at no less than 50
columns, breaks long words and splits words at hyphens (`health-|based`); typer writes `{name}` and
`<str>` where the README writes `NAME`. `HelpLayout` is mixed into the CLI's group and command
classes (cli.py) and fixes that in one place.

Usage errors: `usage_message` words click's and typer's exceptions as one line in our terms
(typer's own are a usage line, a hint and the validation library's message); cli.py prints it.
"""

from __future__ import annotations

import shutil
import textwrap
from enum import Enum
from typing import Any

try:
    from typer import _click  # typer >= 0.2x vendors click
except ImportError:  # older typer uses the click package
    import click as _click  # type: ignore[no-redef]


def _wrap(text: str, width: int, first: str = "", rest: str = "") -> list[str]:
    """Lines of `text` no wider than `width`, broken only between words."""
    wrapper = textwrap.TextWrapper(max(width, 1), initial_indent=first, subsequent_indent=rest,
                                   break_long_words=False, break_on_hyphens=False)
    lines: list[str] = []
    for paragraph in text.split("\n\n"):
        if lines:
            lines.append("")
        lines += wrapper.wrap(" ".join(paragraph.split())) or [first.rstrip()]
    return lines


class HelpFormatter(_click.HelpFormatter):  # type: ignore[misc]
    def __init__(self, indent_increment: int = 2, width: int | None = None, max_width: int | None = None) -> None:
        super().__init__(indent_increment, width=1, max_width=max_width)
        columns = width or shutil.get_terminal_size().columns
        self.width = max(min(columns, max_width or 100) - 2, 20)

    def write_usage(self, prog: str, args: str = "", prefix: str | None = None) -> None:
        head = f"{' ' * self.current_indent}{prefix or 'Usage: '}{prog} "
        indent = " " * min(len(head), 8)
        self.write("\n".join(_wrap(f"{head}{args}", self.width, rest=indent)) + "\n")

    def write_text(self, text: str) -> None:
        indent = " " * self.current_indent
        self.write("\n".join(_wrap(text, self.width, indent, indent)) + "\n")

    def write_dl(self, rows: Any, col_max: int = 30, col_spacing: int = 2) -> None:
        rows = list(rows)
        # Narrow terminals put each description under its term, so that words keep room.
        first_col = min(max((len(term) for term, _ in rows), default=0), col_max) + col_spacing
        stacked = self.width - self.current_indent - first_col < 24
        for term, help_text in rows:
            lead = " " * self.current_indent + term
            if stacked or len(term) > first_col - col_spacing:
                self.write(lead + "\n")
                if help_text:
                    indent = " " * (self.current_indent + 4)
                    self.write("\n".join(_wrap(help_text, self.width, indent, indent)) + "\n")
                continue
            indent = " " * (self.current_indent + first_col)
            lines = _wrap(help_text, self.width, indent, indent) if help_text else [""]
            self.write(lead.ljust(len(indent)) + lines[0].lstrip() + "\n")
            for line in lines[1:]:
                self.write(line + "\n")


class HelpContext(_click.Context):  # type: ignore[misc]
    formatter_class = HelpFormatter


def _metavar(param: Any) -> str:
    return str(param.metavar or param.name.upper())


class HelpLayout:
    """Mixed into the group and command classes, before typer's class."""

    context_class: type[_click.Context] = HelpContext

    def get_help_option(self, ctx: Any) -> Any:
        """-h/--help defaults to False. Unset, it would be None, which typer reads through a pydantic validator it
        builds on first use: about 40 ms at every start-up, for nothing."""
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None and option.default is None:
            option.default = False
        return option

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        for param in self.params:  # type: ignore[attr-defined]
            _skip_validation_when_unset(param)
        return super().parse_args(ctx, args)  # type: ignore[misc, no-any-return]

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []  # type: ignore[attr-defined]
        for param in self.get_params(ctx):  # type: ignore[attr-defined]
            if param.param_type_name == "argument":
                name = _metavar(param) + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        subcommand = getattr(self, "subcommand_metavar", None)  # a group: COMMAND [ARGS]...
        return pieces + ([subcommand] if subcommand else [])

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):  # type: ignore[attr-defined]
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append((_metavar(param), record[1]))  # typer adds `<str>` to the name
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        if hasattr(self, "list_commands"):
            self.format_commands(ctx, formatter)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Each command's first sentence in full, however narrow the terminal (click cuts it to fit one line)."""
        rows = []
        for name in self.list_commands(ctx):  # type: ignore[attr-defined]
            command = self.get_command(ctx, name)  # type: ignore[attr-defined]
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


UsageError: type[Exception] = _click.exceptions.UsageError
NoArgsIsHelp: type[Exception] | None = getattr(_click.exceptions, "NoArgsIsHelpError", None)  # click >= 8.2


def usage_message(error: Any) -> str:
    """`<what is wrong>; <what to do>` for a click UsageError (the caller masks keys in it)."""
    ctx = getattr(error, "ctx", None)
    where = ctx.command_path if ctx is not None else "kimi-rotate"
    see = f"see `{where} --help`"
    exceptions = _click.exceptions
    param = getattr(error, "param", None)
    if isinstance(error, exceptions.NoSuchOption):
        close = sorted(error.possibilities or [])
        return f"{where} has no option {error.option_name}; " + (f"did you mean {close[0]}?" if close else see)
    if isinstance(error, exceptions.MissingParameter) and param is not None:
        return f"{where} needs {_label(param)}; {see}"
    if isinstance(error, exceptions.BadParameter) and param is not None:
        return _bad_value(error, param, see)
    text = str(error.message).strip().rstrip(".")
    return f"{text[:1].lower()}{text[1:]}; {see}"


def _label(param: Any) -> str:
    opts = getattr(param, "opts", None)
    return str(opts[0]) if param.param_type_name == "option" and opts else _metavar(param)


def _bad_value(error: Any, param: Any, see: str) -> str:
    # typer >= 0.2x converts with pydantic and chains its ValidationError, which holds what was typed.
    errors = getattr(error.__cause__, "errors", None)
    typed = errors()[0].get("input") if callable(errors) and errors() else None
    got = f", not {typed!r}" if isinstance(typed, str) else ""
    descriptor = getattr(param, "type_descriptor", None)
    click_type = getattr(param, "type", None)
    choices = getattr(descriptor, "choices", None) or getattr(click_type, "choices", None)
    if choices:
        names = [c.value if isinstance(c, Enum) else str(c) for c in choices]
        listed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
        what = f"{typed!r} is not" if got else "that is not"
        metavar = param.metavar or ""  # `--state STATE`: a state; an argument shown as its choices: its name
        kind = metavar.lower() if metavar.isalpha() else param.name.replace("_", " ")
        return f"{what} a valid {kind}; choose {listed}"
    numeric = getattr(descriptor, "annotation", None) is int or getattr(click_type, "name", "").startswith("integer")
    if numeric:
        low, high = getattr(param, "min", None), getattr(param, "max", None)
        span = f" from {low} to {high}" if low is not None and high is not None else ""
        if low is not None and high is None:
            span = f" of at least {low}"
        return f"{_label(param)} must be a whole number{span}{got}; {see}"
    text = str(error.message).strip().rstrip(".")
    return f"invalid {_label(param)}: {text[:1].lower()}{text[1:]}; {see}"


def _skip_validation_when_unset(param: Any) -> None:
    """typer (>= 0.2x) builds a pydantic validator for a parameter before it looks at the value, even for an option
    left unset (None): the first one costs about 50 ms of imports at every start. An unset optional single-value
    parameter has nothing to validate, so it goes straight to its callback, as typer would send it."""
    process = getattr(param, "process_value", None)
    if process is None or getattr(process, "skips_unset", False) or param.multiple or param.nargs != 1:
        return

    def process_value(ctx: Any, value: Any) -> Any:
        if value is None and not param.required:
            return param.callback(ctx, param, None) if param.callback is not None else None
        return process(ctx, value)

    process_value.skips_unset = True  # type: ignore[attr-defined]
    param.process_value = process_value
