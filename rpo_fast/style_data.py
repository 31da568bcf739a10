"""Style-alignment preference sets (Diffusion-RPO's evaluation task, rebuilt here: the authors did not publish
how they made theirs): Pick-a-Pic winners edited into a style by a local InstructPix2Pix pipeline.

    python -m rpo_fast.style_data --src PICKAPIC_DIR --style vangogh|sketch|winter --editor INSTRUCT_PIX2PIX_DIR \\
        --out styled/vangogh [--limit 10000] [--resolution 512]

Each output row is a Pick-a-Pic v2 row (the same 18 columns) whose ``jpg_0`` is the STYLED image, the winner
(label_0 = 1), and ``jpg_1`` the original winner, the loser (label_1 = 0): ready for ``python -m rpo_fast.cache``
and the trainer. The instruction and the editing settings of the style are recorded in ``OUT/_style.json`` and in
every shard's parquet metadata. Shards of ``--shard-size`` rows are written under a temporary name and renamed
when complete; a rerun resumes after the last complete shard (progress bar, summary at the end).

Our choices (documented in docs/guides/evaluation.md): the instructions below, 20 DDIM steps, text guidance 7.5, image
guidance 1.5, seed = row index; the original caption is kept as the caption.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .cli import run
from .data.style import STYLES, build_style_set


@dataclass
class StyleDataConfig:
    """``python -m rpo_fast.style_data``'s command line: the arguments of ``build_style_set``."""

    src: str = field(metadata=dict(help="Pick-a-Pic v2 parquet folder (or a pairs .jsonl/.csv)"))
    style: Literal[tuple(sorted(STYLES))] = field(metadata=dict(help="the edit applied to each winner"))
    editor: str = field(metadata=dict(help="local InstructPix2Pix pipeline folder (timbrooks/instruct-pix2pix)"))
    out: str = field(metadata=dict(help="output folder of parquet shards (resumed)"))
    limit: int | None = field(default=None, metadata=dict(help="edit at most this many winners"))
    resolution: int = field(default=512, metadata=dict(help="pixels of the edited images"))
    shard_size: int = field(default=256, metadata=dict(help="rows per parquet shard"))
    batch_size: int = field(default=4, metadata=dict(help="images per editor call"))
    seed: int = field(default=0, metadata=dict(help="the edit of row i uses seed_of(seed, i)"))
    device: str | None = field(default=None, metadata=dict(help="default: cuda if available, else cpu"))
    progress: bool = field(default=True, metadata=dict(help="no progress bar", flags=("--no-progress",), switch=True))


EXAMPLE = """example (10,000 Van Gogh pairs from a Pick-a-Pic folder):
  python -m rpo_fast.style_data --src pickapic_v2/data --style vangogh --editor MODELS/instruct-pix2pix \\
      --out styled/vangogh --limit 10000"""


def main(argv: list[str] | None = None) -> None:
    run(
        StyleDataConfig,
        argv,
        lambda cfg: build_style_set(**dataclasses.asdict(cfg)),
        prog="python -m rpo_fast.style_data",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLE,
    )


if __name__ == "__main__":
    main()
