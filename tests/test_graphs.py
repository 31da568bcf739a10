"""--reference-graphs: the reference forward replayed from a CUDA graph. On a CPU the graph is replaced by a stand-in
capture whose replay recomputes the captured function on its static input buffers, which tests everything around the
graph (the input copies, the signature check, the eager fallback, the trainer's wiring); the real capture runs in the
gpu-marked test (benchmarks/gpu_session.sh call1)."""

import pytest
import torch
from trainrun import in_process_trainer, step_losses, train_config

from rpo_fast import cuda_graphs as graphs
from rpo_fast.cuda_graphs import GraphedForward


def stand_in_capture(fn, args):
    """A CPU stand-in for capture_cuda_graph: the output buffer is fixed at capture, and a replay refills it from
    the static inputs only, as a graph does (an input copy that did not happen gives a stale result)."""
    out = fn(*args)

    def replay():
        out.copy_(fn(*args))

    return replay, out


def _inputs(g, rows=4):
    x = torch.randn(rows, 3, 5, 7, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    cond = dict(h=torch.randn(rows, 6, 8, generator=g), added=dict(e=torch.randn(rows, 8, generator=g)))
    return x, t, cond


def _fn(x, t, cond):
    return x * t.view(-1, 1, 1, 1) + cond["h"].sum() + cond["added"]["e"].mean()


def test_replays_follow_fresh_inputs_and_other_shapes_run_eagerly():
    """Four calls with fresh random inputs of the captured signature: each equals the eager function to the bit (the
    inputs reach the static buffers), one capture, four replays. A call of another shape runs eagerly (counted)."""
    calls = []

    def capture(fn, args):
        calls.append(args)
        return stand_in_capture(fn, args)

    g = torch.Generator().manual_seed(0)
    graphed = GraphedForward(_fn, capture=capture)
    for _ in range(4):
        args = _inputs(g)
        assert torch.equal(graphed(*args).clone(), _fn(*args))
    assert len(calls) == 1 and graphed.replays == 4 and graphed.eager_calls == 0
    short = _inputs(g, rows=2)
    assert torch.equal(graphed(*short), _fn(*short))
    assert graphed.eager_calls == 1 and graphed.replays == 4


def test_the_capture_tolerates_the_loaders_thread(monkeypatch):
    """The graph is captured in thread_local error mode: the prefetch thread may pin memory or copy while the trainer
    captures, which the default (global) mode makes an error. CUDA's calls are faked: what is checked is the mode the
    capture asks for."""
    import contextlib

    modes = []

    @contextlib.contextmanager
    def graph(g, **kwargs):
        modes.append(kwargs.get("capture_error_mode", "global"))
        yield

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: type("G", (), {"replay": lambda self: None})())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    graphs.capture_cuda_graph(lambda x: x + 1, (torch.ones(2),), warmup=1)
    assert modes == ["thread_local"]


def test_a_failed_capture_names_the_flag():
    def capture(fn, args):
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="--reference-graphs: capturing the reference forward .* failed"):
        GraphedForward(_fn, capture=capture)(*_inputs(torch.Generator().manual_seed(1)))


def _trainer(runs, out, **kw):
    """Tiny SDXL, with an evaluation set of 3 pairs (at 2 pairs a micro-step: a short last batch)."""
    return in_process_trainer(runs, out, "sdxl", **(dict(eval_pairs=3, eval_every=1) | kw))


@pytest.mark.slow
def test_the_trainer_with_reference_graphs_trains_like_the_plain_path(runs, tmp_path, monkeypatch):
    """Tiny SDXL, DPO, 3 steps, then an evaluation of 3 pairs at micro-batch 2: with --reference-graphs (the stand-in
    capture) the losses and evaluation metrics equal the plain path's to the bit; the reference was captured once and
    replayed for each training micro-step and the full evaluation batch; the short last one ran eagerly."""
    plain = _trainer(runs, tmp_path / "plain")
    want = step_losses(plain, 3)
    want_eval = plain.evaluate()
    monkeypatch.setattr(graphs, "available", lambda: True)
    monkeypatch.setattr(graphs, "capture_cuda_graph", stand_in_capture)
    trainer = _trainer(runs, tmp_path / "graphs", reference_graphs=True)
    got = step_losses(trainer, 3)
    got_eval = trainer.evaluate()
    assert got == want and got_eval == want_eval
    assert trainer.graphed_reference.replays == 3 + 1 and trainer.graphed_reference.eager_calls == 1


def test_reference_graphs_refusals(runs, tmp_path):
    from rpo_fast.config import validate

    cases = [
        (dict(objective="sft"), "--objective sft has no reference model"),
        (dict(lora_rank=4), "the reference is the policy itself"),
        (dict(ref_placement="zero3"), "needs --ref-placement replicated"),
        ({}, "needs a CUDA GPU"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            validate(train_config(runs, tmp_path / "o", reference_graphs=True, **extra))


@pytest.mark.gpu
def test_a_captured_sdxl_unet_replays_the_eager_forward_to_the_bit():
    """The real capture on CUDA: a tiny SDXL UNet in bf16 under inference mode, three fresh random inputs, each replay
    equal to the eager forward to the bit (the same kernels)."""
    from rpo_fast.testing import build_unet

    unet = build_unet("sdxl", device="cuda").to(torch.bfloat16).eval()
    g = torch.Generator("cuda").manual_seed(0)

    def inputs():
        x = torch.randn(4, 4, 16, 16, generator=g, device="cuda", dtype=torch.bfloat16)
        t = torch.randint(0, 1000, (4,), generator=g, device="cuda")
        ehs = torch.randn(4, 77, unet.config.cross_attention_dim, generator=g, device="cuda", dtype=torch.bfloat16)
        added = dict(
            text_embeds=torch.randn(4, 32, generator=g, device="cuda", dtype=torch.bfloat16),
            time_ids=torch.randn(4, 6, generator=g, device="cuda", dtype=torch.bfloat16),
        )
        return x, t, dict(encoder_hidden_states=ehs, added_cond_kwargs=added)

    def forward(x, t, cond):
        return unet(x, t, **cond).sample

    graphed = GraphedForward(forward)
    with torch.inference_mode():
        for _ in range(3):
            args = inputs()
            assert torch.equal(graphed(*args).clone(), forward(*args))
    assert graphed.replays == 3
