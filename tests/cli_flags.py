"""Every CLI's flags as a user sees them: spellings, defaults, choices, types, what is required. Run as a script it
writes ``tests/cli_flags.json``; ``test_cli.test_every_cli_keeps_its_flags`` holds the CLIs to that file.

    python tests/cli_flags.py            # rewrite the golden file (only for a deliberate change of a CLI)
"""

import argparse
import importlib
import json
from pathlib import Path

GOLDEN = Path(__file__).with_name("cli_flags.json")
PACKAGE = str(Path(importlib.import_module("rpo_fast").__file__).parent)
CLIS = (
    "rpo_fast.train",
    "rpo_fast.cache",
    "rpo_fast.reference",
    "rpo_fast.evaluate",
    "rpo_fast.style_data",
    "rpo_fast.demo.__main__",
    "rpo_fast.demo.pretrain",
)


class _Caught(Exception):
    pass


def parser_of(module: str) -> argparse.ArgumentParser:
    """The parser a CLI's ``main`` builds, caught at its ``parse_args``."""
    seen = []
    original = argparse.ArgumentParser.parse_args

    def catch(self, *a, **k):
        seen.append(self)
        raise _Caught

    argparse.ArgumentParser.parse_args = catch
    try:
        importlib.import_module(module).main([])
    except _Caught:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return seen[0]


def _describe(action: argparse.Action) -> dict:
    kind = type(action).__name__
    row = dict(flags=list(action.option_strings), action=kind)
    if kind in ("_StoreTrueAction", "_StoreFalseAction"):  # a flag that switches something on or off
        return dict(row, action="switch")
    default = action.default
    if isinstance(default, str) and default.startswith(PACKAGE):  # a path inside the package: where it is installed
        default = "<rpo_fast>" + default[len(PACKAGE) :]
    row.update(
        default=default if default is None or isinstance(default, bool | int | float | str | list) else repr(default),
        choices=list(action.choices) if action.choices is not None else None,
        type=getattr(action.type, "__name__", "str"),  # argparse keeps a string where no type is given
        required=action.required,
        hidden=action.help == argparse.SUPPRESS,
    )
    return row


def cli_flags() -> dict[str, list[dict]]:
    out = {}
    for module in CLIS:
        parser = parser_of(module)
        rows = [_describe(a) for a in parser._actions if a.option_strings and a.dest != "help"]
        for group in parser._mutually_exclusive_groups:
            rows.append(
                dict(one_of=sorted(f for a in group._group_actions for f in a.option_strings), required=group.required)
            )
        out[module] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
    return out


if __name__ == "__main__":
    flags = cli_flags()
    lines = [
        f'  "{m}": [\n' + ",\n".join("    " + json.dumps(r, sort_keys=True) for r in rows) + "\n  ]"
        for m, rows in flags.items()
    ]
    GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    assert json.loads(GOLDEN.read_text()) == json.loads(json.dumps(flags))
    print(f"wrote {GOLDEN}")
