"""Kernel benchmarks against baselines measured in the same run.

    python bench/gemm_kernels.py            # CUDA: 4096^3 and DeepSeek-V3 expert shapes; CPU: small shapes

Measurements (throughput, higher is better; ratio = ours / baseline):
  fp8_gemm_vs_bf16_*      ``fp8_gemm`` (block-scaled, pre-quantized operands, kernel="auto") vs a bf16 ``torch.matmul``
  fp8_gemm_vs_scaled_mm_* the same vs ``torch._scaled_mm`` with per-tensor scales (the coarse FP8 recipe)
  moe_grouped_vs_loop_*   ``moe_experts_forward`` (grouped GEMMs) vs ``moe_experts_reference`` (per-expert loop)
CUDA only:
  fp8_gemm_auto_vs_{tma,pointer}_kernel_*  the dispatched kernel (on sm_90: cuBLAS's blockwise ``_scaled_mm`` where it
                                         can run, else our TMA kernel) vs each of our two Triton kernels
  moe_grouped_fp8_vs_loop_*              the FP8 grouped experts (weights quantized once, as cached) vs the bf16 loop
  moe_grouped_triton_vs_torch_grouped_mm_*  our bf16 Triton grouped GEMM vs ``torch._grouped_mm``
On CUDA the FP8 GEMM is the Triton kernel; on CPU it is the torch emulation (dequantize + fp32 matmul), so CPU
figures only show the overhead of that emulation, not FP8 speed. The last lines are one JSON object per measurement.
"""

from __future__ import annotations

import functools
import json
import statistics
import time

import torch
from dsalign.kernels.fp8_gemm import cublas_blockwise_refusal, fp8_gemm
from dsalign.kernels.moe import moe_experts_forward, moe_experts_reference
from dsalign.kernels.quant import FP8_DTYPE, FP8_MAX, quantize_act, quantize_weight


def bench_ms(fn, reps: int) -> float:
    """Median wall time in ms (CUDA: triton's do_bench with synchronization)."""
    if torch.cuda.is_available():
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=reps * 10)
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _per_tensor_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = (t.abs().amax().float().clamp_min(1e-4) / FP8_MAX).reshape(())
    return (t.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s


def gemm_rows(m: int, n: int, k: int, device: str, reps: int, unit_scale: float, unit: str) -> list[dict]:
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    x_q, x_s = quantize_act(x)
    w_q, w_s = quantize_weight(w)
    flops = 2 * m * n * k
    ours = flops / bench_ms(lambda: fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=torch.bfloat16), reps) / 1e-3 / unit_scale
    bf16 = flops / bench_ms(lambda: x @ w.t(), reps) / 1e-3 / unit_scale
    xt_q, xt_s = _per_tensor_fp8(x)
    wt_q, wt_s = _per_tensor_fp8(w)
    w_col = wt_q.t()  # _scaled_mm wants the second operand column-major

    def scaled_mm():
        return torch._scaled_mm(xt_q, w_col, scale_a=xt_s, scale_b=wt_s, out_dtype=torch.bfloat16)

    rows = [dict(metric=f"fp8_gemm_vs_bf16_{m}x{n}x{k}", ours=ours, baseline=bf16, unit=unit)]
    if device == "cuda":  # the dispatched kernel against each of our Triton kernels
        for kernel in ("tma", "pointer"):
            run = functools.partial(fp8_gemm, x_q, x_s, w_q, w_s, kernel=kernel)
            t = flops / bench_ms(run, reps) / 1e-3 / unit_scale
            rows.append(dict(metric=f"fp8_gemm_auto_vs_{kernel}_kernel_{m}x{n}x{k}", ours=ours, baseline=t, unit=unit))
        refusal = cublas_blockwise_refusal(x_q, x_s, w_q, w_s, torch.bfloat16)
        print(f"fp8_gemm {m}x{n}x{k}: cuBLAS blockwise path {'refused: ' + refusal if refusal else 'available'}")
    try:
        scaled = flops / bench_ms(scaled_mm, reps) / 1e-3 / unit_scale
        rows.append(dict(metric=f"fp8_gemm_vs_scaled_mm_pertensor_{m}x{n}x{k}", ours=ours, baseline=scaled, unit=unit))
    except (RuntimeError, NotImplementedError) as err:  # report, never hide, a backend without _scaled_mm
        print(f"torch._scaled_mm unavailable for {m}x{n}x{k} on {device}: {err}")
    return rows


def moe_rows(n: int, h: int, i: int, e: int, k: int, device: str, reps: int, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(n, h, device=device, dtype=dtype)
    idx = torch.rand(n, e, device=device).topk(k, dim=1).indices
    wts = torch.rand(n, k, device=device, dtype=dtype)
    gate_up = torch.randn(e, 2 * i, h, device=device, dtype=dtype) * h**-0.5
    down = torch.randn(e, h, i, device=device, dtype=dtype) * i**-0.5
    shape = f"N{n}_H{h}_I{i}_E{e}_K{k}"
    ours = bench_ms(lambda: moe_experts_forward(x, idx, wts, gate_up, down), reps)
    loop = bench_ms(lambda: moe_experts_reference(x, idx, wts, gate_up, down), reps)
    # report throughput (tokens/s) so that higher is better like the GEMM rows
    rows = [dict(metric=f"moe_grouped_vs_loop_{shape}", ours=n / ours * 1e3, baseline=n / loop * 1e3, unit="tokens/s")]
    if device == "cuda":
        from dsalign.kernels.grouped_gemm import ExpertWeightCache

        caches = (ExpertWeightCache(), ExpertWeightCache())  # as the layer holds them: weights quantized once
        fp8 = bench_ms(lambda: moe_experts_forward(x, idx, wts, gate_up, down, fp8=True, caches=caches), reps)
        rows.append(dict(metric=f"moe_grouped_fp8_vs_loop_{shape}", ours=n / fp8 * 1e3, baseline=n / loop * 1e3,
                         unit="tokens/s"))  # fmt: skip
        try:  # torch's own grouped GEMM (CUTLASS) for the bf16 path, as a reference point for our Triton kernel
            torch_mm = bench_ms(lambda: moe_experts_forward(x, idx, wts, gate_up, down, backend="torch"), reps)
            rows.append(dict(metric=f"moe_grouped_triton_vs_torch_grouped_mm_{shape}", ours=n / ours * 1e3,
                             baseline=n / torch_mm * 1e3, unit="tokens/s"))  # fmt: skip
        except (RuntimeError, NotImplementedError) as err:
            print(f"torch grouped path unavailable: {err}")
    return rows


def _print_tuned_configs() -> None:
    from dsalign.kernels import fp8_gemm as mod

    for name in ("_fp8_gemm_tma_kernel", "_fp8_gemm_kernel"):
        tuner = getattr(mod, name)
        for key, cfg in getattr(tuner, "cache", {}).items():
            print(f"autotuned {name} key={key}: {cfg}")


def main() -> None:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rows: list[dict] = []
    if cuda:
        print(f"device: {torch.cuda.get_device_name()}")
        for m, n, k in [(4096, 4096, 4096), (4096, 4096, 7168), (4096, 7168, 2048)]:  # cube; V3 gate_up; V3 down
            rows += gemm_rows(m, n, k, device, reps=50, unit_scale=1e12, unit="TFLOPS")
        rows += moe_rows(4096, 7168, 2048, 32, 8, device, reps=10, dtype=torch.bfloat16)
        _print_tuned_configs()
    else:
        print(f"device: CPU, {torch.get_num_threads()} threads (FP8 GEMM = torch emulation, not a speed claim)")
        for m, n, k in [(512, 512, 512), (256, 512, 896)]:  # small cube; V3 expert gate_up shape / 8
            rows += gemm_rows(m, n, k, device, reps=5, unit_scale=1e9, unit="GFLOPS")
        rows += moe_rows(512, 256, 128, 32, 4, device, reps=5, dtype=torch.float32)
    for r in rows:
        r["ratio"] = r["ours"] / r["baseline"]
        r["ours"], r["baseline"], r["ratio"] = round(r["ours"], 3), round(r["baseline"], 3), round(r["ratio"], 3)
        print(json.dumps({key: r[key] for key in ("metric", "ours", "baseline", "ratio", "unit")}))


if __name__ == "__main__":
    main()
