"""The prefetching loader: the sampler's batches, in the sampler's order, read ahead; its state resumes at the exact
pair; and the training step's tensor code needs no value on the host."""

import pytest
import torch

from rpo_fast.data.dataset import CachedPairs
from rpo_fast.data.loader import PairSampler, PrefetchLoader
from rpo_fast.debug import HostSyncs


def _loader(runs, depth, batch_size=3):
    ds = CachedPairs(runs["root"] / "cache_sd15")
    return PrefetchLoader(ds, PairSampler(len(ds), seed=7), batch_size, torch.device("cpu"), depth=depth)


def _take(loader, n):
    return [loader.next() for _ in range(n)]


def test_prefetching_gives_the_sampler_batches_in_order(runs):
    """48 pairs, batches of 3, 20 batches (over an epoch boundary): depth 0 (main thread) and depth 1, 2, 5 give the
    same picks and the same tensors, equal to the bit."""
    plain = _take(_loader(runs, 0), 20)
    for depth in (1, 2, 5):
        loader = _loader(runs, depth)
        got = _take(loader, 20)
        loader.close()
        for (picks_a, batch_a), (picks_b, batch_b) in zip(plain, got):
            assert picks_a == picks_b
            assert batch_a.keys() == batch_b.keys()
            for k, v in batch_a.items():
                assert v == batch_b[k] if isinstance(v, list) else torch.equal(v, batch_b[k]), k


@pytest.mark.parametrize("depth", [0, 2])
def test_state_is_the_position_after_the_last_batch_handed_out(runs, depth):
    """7 batches, state, a new loader from that state: its batches are batches 8.. of a straight run (the 2 read
    ahead by the first loader are not skipped), across the epoch boundary at batch 16."""
    straight = _take(_loader(runs, depth), 20)
    first = _loader(runs, depth)
    _take(first, 7)
    state = first.state_dict()
    first.close()
    resumed = _loader(runs, depth)
    resumed.load_state_dict(state)
    rest = _take(resumed, 13)
    assert [p for p, _ in rest] == [p for p, _ in straight[7:]]
    # loading a state into a loader that has read ahead drops what it read
    again = _loader(runs, depth)
    _take(again, 3)
    again.load_state_dict(state)
    assert again.next()[0] == straight[7][0]


def test_bad_depth_is_refused(runs):
    with pytest.raises(ValueError, match="prefetch depth must be 0 or more"):
        _loader(runs, -1)


def test_host_sync_counter_sees_item_bool_tolist_and_value_dependent_ops():
    x = torch.randn(5)
    with HostSyncs() as syncs:
        y = x * 2  # none
    assert syncs.calls == [] and y.shape == (5,)
    for fn, what in (
        (lambda: x.sum().item(), "Tensor.item"),
        (lambda: bool(x.sum() > 0), "Tensor.__bool__"),
        (lambda: x.tolist(), "Tensor.tolist"),
        (lambda: x.cpu(), "Tensor.cpu"),
        (lambda: torch.nonzero(x > 0), "aten.nonzero.default"),
        (lambda: x[x > 0], "aten"),  # boolean indexing: nonzero or index with a mask
    ):
        with HostSyncs() as syncs:
            fn()
        assert any(w.startswith(what) for w, _ in syncs.calls), (what, syncs.calls)
    with HostSyncs() as syncs:
        pass
    x.sum().item()
    assert syncs.calls == []  # the methods are restored on exit


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["rpo", "dpo", "dspo", "dpo-precomputed"])
def test_the_step_needs_no_value_on_the_host(runs, tmp_path, objective):
    """Noise, timesteps, caption dropping, both forwards, the loss and the backward of one micro-step (sdxl: its
    conditioning has the most parts) run without a single host read: on a GPU the step never waits for the stream
    there. DeepSpeed's optimizer step (gradient norm, overflow check) is not in the region: it reads the norm.
    dpo-precomputed: the reference's errors read from a table (the loader brings them with the batch)."""
    from trainrun import ROOT

    from rpo_fast.config import TrainConfig
    from rpo_fast.reference import ReferenceConfig, run_pass
    from rpo_fast.train import Trainer

    table = {}
    if objective.endswith("-precomputed"):
        objective = objective.removesuffix("-precomputed")
        path = run_pass(
            ReferenceConfig(
                model=str(runs["sdxl"]), data=str(runs["root"] / "cache_sdxl"), reference_table=str(tmp_path / "t"),
                mixed_precision="no", progress=False, eval_pairs=2,
            )
        )  # fmt: skip
        table = dict(ref_placement="precomputed", reference_table=str(path), max_steps=10)

    cfg = TrainConfig(
        ds_config=str(ROOT / "configs" / "single_gpu.json"),
        model=str(runs["sdxl"]),
        data=str(runs["root"] / "cache_sdxl"),
        output=str(tmp_path / "o"),
        objective=objective,
        micro_batch_size=2,
        mixed_precision="no",
        export=False,
        progress=False,
        tensorboard=False,
        **table,
    )
    trainer = Trainer(cfg)
    trainer.train_step()  # the first step builds what is built once
    picks, batch = trainer.loader.next()
    assert ("ref_errors" in batch) == bool(table)
    with HostSyncs() as syncs:
        out = trainer.forward_loss(batch, trainer.pair_seeds(picks), ref_errors=batch.get("ref_errors"))
        trainer.engine.backward(out.loss)
        trainer.metrics.add(out.metrics)
    trainer.close()
    assert syncs.calls == [], syncs.calls


def test_host_syncs_counts_each_read_and_where():
    """The one counter of host waits: on a CPU, the dispatcher's reads (``.item()`` is seen as the method and as
    its aten op), each with the rpo_fast line that made it ("?" for code outside the package); with dispatch off
    there is nothing to see off CUDA."""
    u = torch.tensor([0.5, -1.0, 0.0])
    with HostSyncs() as syncs:
        u.sum().item()
        u[u > 0]  # a boolean mask: a nonzero
    want = ["Tensor.item", "aten._local_scalar_dense.default", "aten.index.Tensor"]
    assert [what for what, _ in syncs.calls] == want and {w for _, w in syncs.calls} == {"?"}, syncs.calls
    if not torch.cuda.is_available():
        assert syncs.count == 3 and syncs.sites == {"?": 3}
        with HostSyncs(dispatch=False) as quiet:
            u.sum().item()
        assert quiet.count == 0 and not quiet.calls
