"""RPO's global contrast scope on 2 CPU processes (gloo) against one process holding the whole batch.

Gradient convention (stated, tested): the backward of the all-gather sums every rank's gradient for the
rows a rank owns, so each rank's model_pred gradient is WORLD times the single-process gradient of those
rows; after the data-parallel averaging of DeepSpeed and DDP (all-reduce sum / WORLD) the parameter
gradient equals the single-process parameter gradient exactly.
"""

import subprocess
import sys
from pathlib import Path

import dist_rpo_worker as W  # noqa: E402
import pytest
import torch
from helpers import assert_close

from rpo_fast import PreferenceLoss  # noqa: E402


def single_process(weighting, backend="eager"):
    x, target, ref, ew, el, theta0 = W.global_inputs()
    theta = torch.nn.Parameter(theta0.clone())
    pred = theta * x
    pred.retain_grad()
    fn = PreferenceLoss("rpo", backend=backend, beta=100.0, tau=0.5, weighting=weighting, scope="local")
    res = fn(pred, target, ref, embeds_w=ew, embeds_l=el)
    res.loss.backward()
    return res, theta.grad, pred.grad


def run_workers(tmp_path, backend, weighting):
    out = tmp_path / f"{backend}-{weighting}.pt"
    proc = subprocess.run(
        [sys.executable, str(Path(W.__file__)), str(out), backend, weighting],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.multiprocess
@pytest.mark.parametrize("weighting", ["inside", "outside"])
def test_global_scope_equals_one_process_on_the_concatenated_batch(tmp_path, weighting):
    got = run_workers(tmp_path, "eager", weighting)
    # one all-gather per micro-step carries the errors and both embeddings; its backward is one reduce-scatter
    # (each rank receives its rows' summed gradient), not an all-reduce of the whole gathered gradient
    assert got["forward_collectives"] == {"all_reduce": 0, "reduce_scatter_tensor": 0, "all_gather_into_tensor": 1}
    assert got["backward_collectives"] == {"all_reduce": 0, "reduce_scatter_tensor": 1, "all_gather_into_tensor": 0}
    ref, theta_grad, pred_grad = single_process(weighting)
    for loss in got["losses"]:  # every rank computes the same global loss
        assert_close("loss", loss, ref.loss, atol=0, rtol=1e-6)
    for k, v in ref.metrics.items():
        assert_close(k, got["metrics"][k], v, atol=1e-7, rtol=1e-5)
    assert_close("theta grad (averaged)", got["theta_grad"], theta_grad, atol=1e-7, rtol=1e-5)
    b = W.WORLD * W.B_LOCAL
    for rank, g in enumerate(got["pred_grads"]):
        expected = W.local_rows(pred_grad, rank, b) * W.WORLD
        assert_close(f"rank {rank} model_pred grad", g, expected, atol=1e-7, rtol=1e-5)
    # and the global contrast differs from each rank contrasting only its own pairs
    local = PreferenceLoss("rpo", backend="eager", beta=100.0, weighting=weighting, scope="local")
    x, target, refp, ew, el, theta0 = W.global_inputs()
    half = local(
        W.local_rows(theta0 * x, 0, b),
        W.local_rows(target, 0, b),
        W.local_rows(refp, 0, b),
        embeds_w=ew[: W.B_LOCAL],
        embeds_l=el[: W.B_LOCAL],
    )
    assert abs(half.loss.item() - ref.loss.item()) > 1e-4
