"""The command-line layer every CLI of rpo_fast goes through: a config dataclass in, one line per user error out.

A CLI's options are the fields of a dataclass: the field's type gives argparse's ``type`` (``Literal[...]`` its
``choices``, ``bool`` a ``--flag/--no-flag`` pair, ``list[T]`` a repeatable flag), its default is the default shown
in ``--help``, and its ``metadata`` holds the help text and, rarely:

    flags=("--a", "--b")       other option strings than --the-field-name
    switch=True                a bool as ONE flag that flips the default (``--fresh``; ``--no-progress``)
    choices=callable           the choices, read when a parser is built (a table that extensions may add rows to)
    one_of="NAME"              the fields sharing NAME are mutually exclusive (``required=True`` on one of them: one
                               must be given)

    def main(argv=None):
        return run(EvaluateConfig, argv, evaluate_from_config, prog="python -m rpo_fast.evaluate", ...)

``run`` parses, silences the dependencies' known log noise and runs the body; an error the user caused (a bad flag,
argparse's included, or one of ``USER_ERRORS`` raised by the body) ends in one line, ``PROG: error: MESSAGE``, and
exit code 2 (the usage only with ``--help``). ``RPO_FAST_DEBUG=1`` lets the body's errors raise, traceback and all.
``check_choices`` applies a config's choices to one built in Python. Of rpo_fast, this module imports only ``logs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Literal


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows each option's default once: not when it is None or hidden, nor when
    the help text already says what the default is; a ``--flag/--no-flag`` pair's as the flag that is on by default.
    The docstrings' reStructuredText ````code```` shows as `code`."""

    def _get_help_string(self, action):
        text = (action.help or "").removesuffix(" (default: %(default)s)")  # BooleanOptionalAction's own suffix
        if action.default in (None, argparse.SUPPRESS) or not action.option_strings or "default" in text.lower():
            return text
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            on, off = action.option_strings[:2]
            return f"{text} (default: {on if action.default else off})".strip()
        return f"{text} (default: %(default)s)".strip()

    def format_help(self) -> str:
        return super().format_help().replace("``", "`")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, ``PROG: error: MESSAGE``, exit code 2: the usage that argparse
    prints first (50 lines for the trainer) hid the line that matters; ``--help`` shows it."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _choices(tp) -> tuple | None:
    for t in (tp, *typing.get_args(tp)):
        if typing.get_origin(t) is Literal:
            return typing.get_args(t)
    return None


def choices_of(f: dataclasses.Field, tp) -> tuple | None:
    """A field's choices: ``metadata["choices"]()``, or its ``Literal``'s."""
    return tuple(f.metadata["choices"]()) if "choices" in f.metadata else _choices(tp)


def _base_type(tp):
    """int for ``int | None``, str for a Literal of strings."""
    choices = _choices(tp)
    if choices is not None:
        return type(choices[0])
    return next(t for t in (typing.get_args(tp) or (tp,)) if t is not type(None))  # Optional[T] -> T


def flags_of(f: dataclasses.Field) -> tuple[str, ...]:
    """A field's option strings: ``metadata["flags"]``, or --the-name."""
    return f.metadata.get("flags", (f"--{f.name.replace('_', '-')}",))


def flag_of(f: dataclasses.Field) -> str:
    return flags_of(f)[0]


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One option per field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    one_required = {f.metadata["one_of"] for f in dataclasses.fields(cls) if f.metadata.get("required")}
    for f in dataclasses.fields(cls):
        tp, meta = hints[f.name], f.metadata
        kw = dict(dest=f.name, help=meta.get("help"))
        flags = flags_of(f)
        target = parser
        if "one_of" in meta:
            if meta["one_of"] not in groups:
                groups[meta["one_of"]] = parser.add_mutually_exclusive_group(required=meta["one_of"] in one_required)
            target = groups[meta["one_of"]]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if tp is bool and meta.get("switch"):
            target.add_argument(*flags, action="store_false" if f.default else "store_true", **kw)
        elif tp is bool:
            target.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default, **kw)
        elif typing.get_origin(tp) is list:
            target.add_argument(*flags, action="append", type=typing.get_args(tp)[0], default=[], **kw)
        else:
            default = None if required else f.default
            target.add_argument(
                *flags, type=_base_type(tp), choices=choices_of(f, tp), required=required, default=default, **kw
            )


def parser_for(cls, **parser_kw) -> ArgumentParser:
    """The parser of the dataclass ``cls`` (``parser_kw``: prog, description, epilog)."""
    ap = ArgumentParser(formatter_class=HelpFormatter, **parser_kw)
    add_arguments(ap, cls)
    return ap


def parse_config(cls, argv: list[str] | None, **parser_kw):
    """Parse ``argv`` into an instance of the dataclass ``cls``."""
    return cls(**vars(parser_for(cls, **parser_kw).parse_args(argv)))


# The errors a user causes: a path that is missing or of the wrong kind, a flag or value that is refused, a file
# that is not what it should be (the checks raise these with a message naming the path, flag or value).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def run_cli(prog: str, body: typing.Callable[[], typing.Any]):
    """Run a CLI's work: an error the user caused (``USER_ERRORS``) ends in one line, ``PROG: error: MESSAGE``, and
    exit code 2 (argparse's), with no traceback. ``RPO_FAST_DEBUG=1`` lets it raise, traceback and all."""
    try:
        return body()
    except USER_ERRORS as e:
        if os.environ.get("RPO_FAST_DEBUG") == "1":
            raise
        message = str(e).strip() or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run(cls, argv: list[str] | None, body: typing.Callable, *, prog: str, quiet: bool = True, **parser_kw):
    """A CLI's ``main``: parse ``argv`` into ``cls``, silence the known log noise (``quiet``), return ``body(cfg)``
    with the user's errors as one line (``run_cli``)."""
    cfg = parse_config(cls, argv, prog=prog, **parser_kw)
    if quiet:
        from .logs import quiet_known_noise

        quiet_known_noise()
    return run_cli(prog, lambda: body(cfg))


def check_choices(cfg) -> None:
    """The Literal fields of a config built in Python hold one of their choices (argparse checks the CLI's)."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        choices, value = choices_of(f, hints[f.name]), getattr(cfg, f.name)
        if choices is not None and value is not None and value not in choices:
            raise ValueError(f"{flag_of(f)} must be one of: {', '.join(map(str, choices))}; got {value!r}")


def flag_table(cls) -> str:
    """The markdown table of a config's flags (flag, default, choices, help), as each command's page shows it."""
    hints = typing.get_type_hints(cls, include_extras=True)
    rows = ["| flag | default | choices | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help") or ""
        if text == argparse.SUPPRESS:
            continue
        flag = flag_of(f)
        if hints[f.name] is bool and not f.metadata.get("switch"):
            flag = f"{flag} / --no-{flag[2:]}"
        required = f.default is dataclasses.MISSING
        default = "required" if required else "-" if f.default is None else f"`{f.default}`"
        choices = choices_of(f, hints[f.name])
        listed = " ".join(f"`{c}`" for c in choices) if choices else ""
        rows.append(f"| `{flag}` | {default} | {listed} | {text.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)
