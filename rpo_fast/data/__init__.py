"""The data package, bottom up:

    readers     the input formats (parquet, datasets folders, JSONL/CSV/JSON; pairs, labels, ranked lists) and their
                column mappings, streamed as ``RawPair``s with skipped rows counted by cause
    preprocess  the reference recipe's resize, crop and flip of a pair's images
    encode      a family's encoding of a batch of pairs (latents, text and image conditioning, CLIP embeddings) and
                the fingerprint of what a cache depends on
    schema      the cache's format: its files, the per-caption and per-pair tensors, its errors
    writer      the cache writer (``python -m rpo_fast.cache``)
    dataset     the cache's reader and raw pairs encoded on the fly: the training dataset (it does not import the
                writer)
    loader      the seeded, resumable sampler across ranks and the prefetching loader
    style       the style-alignment pair sets (``python -m rpo_fast.style_data``)

``from rpo_fast import data as D`` gives the readers' and the preprocessing's names (``D.iter_pairs``,
``D.Columns``, ``D.Crop``...).
"""

from .preprocess import Crop, pair_rng, preprocess, preprocess_pair, preprocess_pairs
from .readers import (
    COLUMNS_HELP,
    DECODE_THREADS,
    PICKAPIC,
    PICKAPIC_COLUMNS,
    PICKAPIC_V2_SCHEMA,
    RANKING_HELP,
    RANKING_RULES,
    Columns,
    DataError,
    RawPair,
    SkipCounts,
    Source,
    describe_source,
    encode_image,
    iter_pairs,
    load_image,
    open_source,
    pickapic_files,
    pickapic_schema,
    ranked_pairs,
    row_offsets,
)

__all__ = [
    "COLUMNS_HELP",
    "DECODE_THREADS",
    "PICKAPIC",
    "PICKAPIC_COLUMNS",
    "PICKAPIC_V2_SCHEMA",
    "RANKING_HELP",
    "RANKING_RULES",
    "Columns",
    "Crop",
    "DataError",
    "RawPair",
    "SkipCounts",
    "Source",
    "describe_source",
    "encode_image",
    "iter_pairs",
    "load_image",
    "open_source",
    "pair_rng",
    "pickapic_files",
    "pickapic_schema",
    "preprocess",
    "preprocess_pair",
    "preprocess_pairs",
    "ranked_pairs",
    "row_offsets",
]
