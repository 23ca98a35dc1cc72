"""One rank of the EP=2 test (launched by test_ep.py as a subprocess): runs ep_moe_forward + backward on gloo.

Usage: python _ep_worker.py RANK WORLD PORT OUT_DIR [starve]
"""

import os
import sys

import torch
import torch.distributed as dist

H, I, E, K = 24, 16, 6, 2  # E experts over 2 ranks: 3 local experts each


def full_weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    gate_up = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    down = torch.randn(E, H, I, generator=g) * I**-0.5
    return gate_up, down


def make_case(rank: int, starve: bool = False) -> dict[str, torch.Tensor]:
    """Uneven loads: expert 0 hot, expert 4 never chosen, rank 1's tokens all go to rank 0's experts (so rank 1
    sends nothing to itself and receives rows only from rank 0). ``starve``: every token of both ranks goes to rank
    0's experts, so rank 1's experts get no rows at all (its backward must still join the all-to-alls)."""
    g = torch.Generator().manual_seed(100 + rank)
    n = 13 if rank == 0 else 9
    allowed = torch.tensor([0, 1, 2, 3, 5]) if rank == 0 and not starve else torch.tensor([0, 1, 2])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(n)])
    idx[: n // 2, 0] = 0
    idx[: n // 2, 1] = torch.where(idx[: n // 2, 1] == 0, 1, idx[: n // 2, 1])
    return {
        "x": torch.randn(n, H, generator=g),
        "idx": idx,
        "weight": torch.rand(n, K, generator=g),
        "grad_out": torch.randn(n, H, generator=g),
    }


def main() -> None:
    from dsalign.kernels.ep import ep_moe_forward

    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    starve = len(sys.argv) > 5 and sys.argv[5] == "starve"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    case = make_case(rank, starve)
    gate_up, down = full_weights()
    n_local = E // world
    local_gate_up = gate_up[rank * n_local : (rank + 1) * n_local].clone().requires_grad_()
    local_down = down[rank * n_local : (rank + 1) * n_local].clone().requires_grad_()
    x = case["x"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    out = ep_moe_forward(x, case["idx"], w, local_gate_up, local_down, backend="torch")
    (out * case["grad_out"]).sum().backward()
    with torch.no_grad():  # the generation path: same dispatch, no autograd
        out_nograd = ep_moe_forward(x, case["idx"], w, local_gate_up, local_down, backend="torch")
    torch.save(
        {
            "out": out.detach(),
            "out_nograd": out_nograd,
            "x_grad": x.grad,
            "weight_grad": w.grad,
            "gate_up_grad": local_gate_up.grad,
            "down_grad": local_down.grad,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
