"""MkDocs hook (mkdocs.yml ``hooks:``): the generated parts of the documentation site.

A page line ``<!-- doc: MODULE -->`` becomes that module's docstring (a command's own description, what its
``--help`` prints first); ``<!-- flags: MODULE:CLASS -->`` becomes the table of that config dataclass's flags
(``rpo_fast.cli.flag_table``: flag, default, choices, meaning), the same fields argparse reads for ``--help``; so each
command's reference page is its config, never a copy of it. ``<!-- metric keys -->`` becomes the table of every key
the trainer logs (``rpo_fast.metrics.key_table``).
"""

from __future__ import annotations

import importlib
import re

FLAGS = re.compile(r"^<!-- flags: ([\w.]+):(\w+) -->$", re.M)
DOC = re.compile(r"^<!-- doc: ([\w.]+) -->$", re.M)
METRIC_KEYS = "<!-- metric keys -->"


def flags(match: re.Match) -> str:
    from rpo_fast.cli import flag_table

    return flag_table(getattr(importlib.import_module(match[1]), match[2]))


def doc(match: re.Match) -> str:
    import inspect

    return inspect.getdoc(importlib.import_module(match[1])) or ""


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = DOC.sub(doc, FLAGS.sub(flags, markdown))
    if METRIC_KEYS in markdown:
        from rpo_fast.metrics import key_table

        markdown = markdown.replace(METRIC_KEYS, key_table())
    return markdown
