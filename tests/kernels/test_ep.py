"""Expert parallelism (EP=2 over gloo) equals the single-process MoE: output and x / weight / router grads."""

import os
import sys

import pytest
import torch
from dsalign.kernels.moe import moe_experts_forward

WORKER = os.path.join(os.path.dirname(__file__), "_ep_worker.py")


@pytest.mark.distributed
@pytest.mark.parametrize("starve", [False, True], ids=["uneven", "rank1_experts_idle"])
def test_ep2_matches_single_process(tmp_path, launch_workers, starve):
    """``rank1_experts_idle``: rank 1's experts get no rows; its expert output must stay in the autograd graph, or
    its backward skips the all-to-alls rank 0 waits in (a hang)."""
    sys.path.insert(0, os.path.dirname(__file__))
    import _ep_worker as case_def

    world = 2
    launch_workers(WORKER, world, [str(tmp_path)] + (["starve"] if starve else []), timeout=120)

    gate_up, down = case_def.full_weights()
    gate_up.requires_grad_()
    down.requires_grad_()
    n_local = case_def.E // world
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in range(world):
        case = case_def.make_case(r, starve)
        x = case["x"].clone().requires_grad_()
        w = case["weight"].clone().requires_grad_()
        out = moe_experts_forward(x, case["idx"], w, gate_up, down, backend="torch")
        (out * case["grad_out"]).sum().backward()  # weight grads accumulate over both ranks' tokens
        torch.testing.assert_close(got[r]["out"], out.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[r]["out_nograd"], out.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[r]["x_grad"], x.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[r]["weight_grad"], w.grad, atol=1e-5, rtol=1e-5)
    for r in range(world):
        sl = slice(r * n_local, (r + 1) * n_local)
        torch.testing.assert_close(got[r]["gate_up_grad"], gate_up.grad[sl], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[r]["down_grad"], down.grad[sl], atol=1e-5, rtol=1e-5)
    assert (gate_up.grad[4] == 0).all() and (got[1]["gate_up_grad"][1] == 0).all()  # expert 4 got no tokens
    assert got[0]["gate_up_grad"].abs().sum() > 0
    if starve:  # rank 1's experts saw no row: zero gradients, and its backward still finished
        assert (got[1]["gate_up_grad"] == 0).all() and (got[1]["down_grad"] == 0).all()
    else:
        assert got[1]["down_grad"].abs().sum() > 0
