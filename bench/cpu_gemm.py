"""fp32 CPU GEMMs: oneDNN (``kernels/cpu_gemm.py``, what the model uses on CPU) vs ``torch.mm`` (torch's BLAS, MKL in
the official wheels), at the ``bench`` preset's training shapes and the demo model's decode shapes.

    python bench/cpu_gemm.py [--threads 2] [--repeats 7]

For every shape ``M x K x N`` (``x [M, K] @ W^T``, ``W [N, K]``) the three GEMMs of a linear layer's step are timed:
forward ``x @ W^T``, input gradient ``g @ W`` and weight gradient ``g^T @ x`` (the operands as a training step hands
them over: transposed views, not copies). Each is the median of ``repeats`` calls after two warm-up calls (oneDNN
compiles a kernel on a shape's first call). Also checked per GEMM: both results against an fp64 product (relative
max error, printed). The last lines are one JSON object per measurement, ``ratio = ours / baseline`` in GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from dsalign.kernels import cpu_gemm

# name: (M, K, N)
SHAPES = {
    "bench_head_chunk": (1024, 512, 32000),
    "bench_q_b": (2048, 192, 768),
    "bench_kv_b": (2048, 128, 1024),
    "bench_o": (2048, 512, 512),
    "bench_mlp_up": (2048, 512, 1536),
    "bench_mlp_down": (2048, 1536, 512),
    "bench_expert_up": (256, 512, 512),
    "bench_expert_down": (256, 256, 512),
    "small_update_head": (2048, 192, 600),
    "small_update_q_b": (2048, 96, 576),
    "small_decode_head": (64, 192, 600),
    "small_decode_q_b": (64, 96, 576),
}


def _time(fn, repeats: int) -> float:
    fn(), fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_gemm.onednn_available():
        raise SystemExit("this torch build cannot run oneDNN's linear op: nothing to compare")
    lines = []
    total = {"ours": 0.0, "baseline": 0.0}
    for name, (M, K, N) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        x, w, dy = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(M, N, generator=g)
        for role, (a, b) in {"fwd": (x, w.t()), "dgrad": (dy, w), "wgrad": (dy.t(), x)}.items():
            ref = a.double() @ b.double()
            with cpu_gemm.cpu_gemm("onednn"):
                saved = cpu_gemm.MIN_MACS, cpu_gemm.MIN_ROWS
                cpu_gemm.MIN_MACS = cpu_gemm.MIN_ROWS = 0  # time oneDNN itself, also where the size rule says torch
                try:
                    # contiguous, as torch.mm returns it: oneDNN may hand back a transposed view (K < N weight
                    # gradients), which the step then copies (_Linear.backward, the parameter's .grad)
                    ours = _time(lambda a=a, b=b: cpu_gemm.mm(a, b).contiguous(), args.repeats)
                    err_ours = float((cpu_gemm.mm(a, b).double() - ref).abs().max() / ref.abs().max())
                finally:
                    cpu_gemm.MIN_MACS, cpu_gemm.MIN_ROWS = saved
            base = _time(lambda a=a, b=b: torch.mm(a, b), args.repeats)
            err_base = float((torch.mm(a, b).double() - ref).abs().max() / ref.abs().max())
            flop = 2 * M * K * N
            total["ours"] += ours
            total["baseline"] += base
            gf_ours, gf_base = flop / ours / 1e9, flop / base / 1e9
            print(f"{name:20s} {role:5s} {M:5d}x{K:5d}x{N:5d}  oneDNN {gf_ours:6.1f}  torch.mm {gf_base:6.1f} GFLOP/s  "
                  f"x{gf_ours / gf_base:4.2f}  rel err {err_ours:.1e} / {err_base:.1e}")  # fmt: skip
            lines.append({"metric": f"{name}_{role}_gflops", "ours": round(gf_ours, 1), "baseline": round(gf_base, 1),
                          "ratio": round(gf_ours / gf_base, 3), "unit": "GFLOP/s"})  # fmt: skip
    lines.append({"metric": "all_shapes_total_time", "ours": round(total["ours"], 4),
                  "baseline": round(total["baseline"], 4), "ratio": round(total["baseline"] / total["ours"], 3),
                  "unit": "s (ratio = speedup)"})  # fmt: skip
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
