import os

# Triton kernels run under the interpreter on CPU machines; must be set before triton is imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: runs on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# What a one-process Trainer (rpo_fast.distributed.init_distributed) writes into os.environ: left there, every later
# test's subprocess would inherit this process's rendezvous port (EADDRINUSE) and rank.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")


@pytest.fixture(autouse=True)
def _no_distributed_env_left_behind():
    saved = {k: os.environ.get(k) for k in DIST_VARS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    """A tiny random SD1.5-style pipeline folder (epsilon prediction), written once per session."""
    from rpo_fast.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd15", "sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny random SDXL-style pipeline folder (two text encoders, text_time conditioning)."""
    from rpo_fast.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Tiny SD1.5 and SDXL models, a tiny CLIP, and caches of a learnable (warm beats cool) preference."""
    from rpo_fast import testing as T
    from rpo_fast.data.writer import build_cache

    root = tmp_path_factory.mktemp("train")
    d = dict(root=root, clip=T.save_tiny_clip(root / "clip"))
    for kind in ("sd15", "sdxl"):
        d[kind] = T.save_tiny_pipeline(root / kind, kind)
    T.write_warm_preference_pairs(root / "warm", 48, seed=0)
    T.write_warm_preference_pairs(root / "warm_eval", 64, seed=1)
    for kind in ("sd15", "sdxl"):
        build_cache(
            d[kind],
            root / "warm" / "pairs.jsonl",
            root / f"cache_{kind}",
            resolution=32,
            embedder=str(d["clip"]),
            shard_size=16,
            batch_size=16,
            progress=False,
            rank=0,
            world=1,
        )
    build_cache(
        d["sd15"],
        root / "warm_eval" / "pairs.jsonl",
        root / "eval_sd15",
        resolution=32,
        shard_size=64,
        batch_size=16,
        progress=False,
        rank=0,
        world=1,
    )
    return d


@pytest.fixture
def restore_linear():
    """ZeRO-3 replaces torch.nn.functional.linear for the whole process: put it back for the tests that follow."""
    import torch

    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear
