"""Grouped GEMM over stacked expert weights (bf16/fp32 and FP8), with autograd, for the MoE layer.

Shape legend: R rows (token-expert assignments) sorted by expert, E experts, K input features, O output features.

``grouped_gemm(x_RK, w_EOK, counts_E)`` computes ``y[rows of e] = x[rows of e] @ w[e]^T`` (``nn.Linear`` layout).

* Forward and activation gradient: one Triton launch over (row tile, output tile); each row tile belongs to exactly
  one expert (tiles never straddle a group boundary), its expert id is looked up from a tile table built on the
  device without a host sync (at most ceil(R/BLOCK_M) + E tiles).
* Weight gradient: one launch over (expert, O tile, K tile); each program walks its expert's rows.
* FP8 (``fp8=True``): DeepSeek-V3 recipe as in ``fp8_gemm``. Forward: x in 1x128 tiles along K, w[e] in 128x128
  blocks; dgrad: dy in 1x128 tiles along O, w[e]^T blocks; wgrad: dy^T and x^T in 1x128 tiles along the rows, the
  tiles restarting at every expert's first row (so a tile never mixes two experts' tokens). The wgrad kernel
  quantizes those tiles on the fly from the saved high-precision x and dy.

On CPU the bf16/fp32 path is ``moe.grouped_mm`` (``torch._grouped_mm`` or a padded ``bmm``); the FP8 torch path
emulates the same quantization (dequantize, then the vectorized grouped matmul) -- see ``*_ref`` below.
"""

from __future__ import annotations

import contextlib

import torch
from dsalign.kernels._backend import HAS_TRITON, triton_interpret, use_triton
from dsalign.kernels.fp8_gemm import FP8WeightCache, QuantizedWeight
from dsalign.kernels.quant import BLOCK, dequantize_ref, quantize_act, quantize_weight, scale_from_amax
from torch.utils.weak import WeakIdKeyDictionary

if HAS_TRITON:
    import triton
    import triton.language as tl
    from dsalign.kernels.quant import _clamp_e4m3, _nan_amax, _round_to_e4m3, _scale_from_amax


# --------------------------------------------------------------------------------------------------------------------
# torch references (also the CPU path)
# --------------------------------------------------------------------------------------------------------------------


def grouped_gemm_loop_ref(x_RK: torch.Tensor, w_EOK: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Plain per-expert loop: the readable reference."""
    outs = [xe @ w_EOK[e].t() for e, xe in enumerate(torch.split(x_RK, counts_E.tolist()))]
    return torch.cat(outs) if outs else x_RK.new_zeros(0, w_EOK.shape[1])


def _padded_bmm(x_RK: torch.Tensor, w_EKO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    from dsalign.kernels.moe import grouped_mm_padded  # moe imports this module; import lazily

    return grouped_mm_padded(x_RK, w_EKO, counts_E)


def dequantize_experts(q_EOK: torch.Tensor, s_EOK: torch.Tensor) -> torch.Tensor:
    return torch.stack([dequantize_ref(q, s, BLOCK, BLOCK) for q, s in zip(q_EOK, s_EOK)])


def segment_tile_dequant_ref(x_RC: torch.Tensor, counts_E: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """Quantize-dequantize x in 128x1 tiles along the rows, tiles restarting at every group (the wgrad operands)."""
    r, c = x_RC.shape
    if r == 0:
        return x_RC.float()
    group = torch.repeat_interleave(torch.arange(len(counts_E), device=x_RC.device), counts_E)
    starts = torch.cumsum(counts_E, 0) - counts_E
    tiles_E = (counts_E + BLOCK - 1) // BLOCK
    tile_base = torch.cumsum(tiles_E, 0) - tiles_E
    tile = tile_base[group] + (torch.arange(r, device=x_RC.device) - starts[group]) // BLOCK
    n_tiles = int(tiles_E.sum())
    amax = x_RC.new_zeros(n_tiles, c, dtype=torch.float32)
    amax = amax.scatter_reduce(0, tile[:, None].expand(r, c), x_RC.float().abs(), "amax", include_self=True)
    s = scale_from_amax(amax, pow2)[tile]
    q = (x_RC.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.float() * s


def _fp8_forward_ref(x_RK, q: QuantizedWeight, counts_E, pow2, transpose_w: bool) -> torch.Tensor:
    x_q, x_s = quantize_act(x_RK, pow2=pow2, backend="torch")
    x_deq = dequantize_ref(x_q, x_s, 1, BLOCK)
    w_deq = dequantize_experts(*q.transposed()) if transpose_w else dequantize_experts(q.q, q.s)
    return _padded_bmm(x_deq, w_deq.transpose(1, 2), counts_E)


def _wgrad_ref(dy_RO, x_RK, counts_E, fp8: bool, pow2: bool) -> torch.Tensor:
    if fp8:
        dy_RO, x_RK = segment_tile_dequant_ref(dy_RO, counts_E, pow2), segment_tile_dequant_ref(x_RK, counts_E, pow2)
    segs = zip(torch.split(dy_RO.float(), counts_E.tolist()), torch.split(x_RK.float(), counts_E.tolist()))
    return torch.stack([d.t() @ x for d, x in segs])


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _grouped_gemm_kernel(
        x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, tile_group_ptr, tile_row_ptr, group_end_ptr, O, K,
        stride_xr, stride_xk, stride_we, stride_wo, stride_wk, stride_yr, stride_yo,
        stride_xsr, stride_xsk, stride_wse, stride_wso, stride_wsk,
        FP8: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """y[rows] = x[rows] @ w[g]^T for one (row tile, output tile); the tile's expert g comes from the table."""
        g = tl.load(tile_group_ptr + tl.program_id(0))
        if g < 0:
            return
        row0 = tl.load(tile_row_ptr + tl.program_id(0))
        row_end = tl.load(group_end_ptr + g)
        rows = row0 + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        r_ok = rows < row_end
        n_ok = offs_n < O
        g64 = g.to(tl.int64)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xr + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + g64 * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wo
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kb * BLOCK_K
            x = tl.load(x_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if FP8:
                x_s = tl.load(xs_ptr + rows * stride_xsr + kb * stride_xsk, mask=r_ok, other=0.0)
                w_s = tl.load(ws_ptr + g64 * stride_wse + (offs_n // 128) * stride_wso + kb * stride_wsk, mask=n_ok)
                acc += tl.dot(x, w) * x_s[:, None] * w_s[None, :]
            else:
                if UPCAST:
                    x, w = x.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_yr + offs_n[None, :] * stride_yo
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _grouped_wgrad_kernel(
        dy_ptr, x_ptr, dw_ptr, group_start_ptr, counts_ptr, O, K,
        stride_dyr, stride_dyo, stride_xr, stride_xk, stride_dwe, stride_dwo, stride_dwk,
        FP8: tl.constexpr, POW2: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """dw[e] = dy[rows of e]^T @ x[rows of e]; FP8 quantizes 128-row tiles (per column) on the fly."""
        e = tl.program_id(0)
        start = tl.load(group_start_ptr + e)
        count = tl.load(counts_ptr + e)
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        o_ok = offs_o < O
        k_ok = offs_k < K
        acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, count, BLOCK_R):
            rows = (start + r0 + offs_r).to(tl.int64)
            r_ok = r0 + offs_r < count
            # dy^T tile loaded directly as [BLOCK_O, BLOCK_R]
            dyt = tl.load(dy_ptr + rows[None, :] * stride_dyr + offs_o[:, None] * stride_dyo,
                          mask=o_ok[:, None] & r_ok[None, :], other=0.0)  # fmt: skip
            x = tl.load(x_ptr + rows[:, None] * stride_xr + offs_k[None, :] * stride_xk,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            if FP8:
                dyt = dyt.to(tl.float32)
                x = x.to(tl.float32)
                s_dy = _scale_from_amax(_nan_amax(dyt, 1), POW2)
                s_x = _scale_from_amax(_nan_amax(x, 0), POW2)
                dyt_q = _round_to_e4m3(_clamp_e4m3(tl.math.div_rn(dyt, s_dy[:, None])))
                x_q = _round_to_e4m3(_clamp_e4m3(tl.math.div_rn(x, s_x[None, :])))
                part = tl.dot(dyt_q.to(tl.float8e4nv), x_q.to(tl.float8e4nv))
                acc += part * s_dy[:, None] * s_x[None, :]
            else:
                if UPCAST:
                    dyt, x = dyt.to(tl.float32), x.to(tl.float32)
                acc = tl.dot(dyt, x, acc, input_precision=DOT_PREC)
        dw_ptrs = dw_ptr + e.to(tl.int64) * stride_dwe + offs_o[:, None] * stride_dwo + offs_k[None, :] * stride_dwk
        tl.store(dw_ptrs, acc, mask=o_ok[:, None] & k_ok[None, :])


def _tile_table(counts_E: torch.Tensor, block_m: int, n_rows: int) -> tuple[torch.Tensor, ...]:
    """Per row tile: its expert (-1 for unused slots) and first row; built on the device, no host sync."""
    counts = counts_E.to(torch.int64)
    group_end = torch.cumsum(counts, 0)
    group_start = group_end - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = -(-n_rows // block_m) + counts.numel()
    t = torch.arange(max_tiles, device=counts.device)
    g = torch.searchsorted(tile_end, t, right=True)
    valid = g < counts.numel()
    g_c = g.clamp(max=counts.numel() - 1)
    row0 = group_start[g_c] + (t - (tile_end[g_c] - tiles[g_c])) * block_m
    tile_group = torch.where(valid, g_c, -1).to(torch.int32)
    return tile_group, row0.to(torch.int32), group_end.to(torch.int32), group_start.to(torch.int32)


def _dot_precision(x: torch.Tensor) -> str:
    """fp32 inputs get full-precision dots (not tf32) so fp32 runs stay comparable to torch at 1e-5."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _upcast(x: torch.Tensor) -> bool:
    """The Triton 3.9 interpreter computes bf16 ``tl.dot`` wrongly (garbage, while fp16/fp32/fp8 are right); there we
    upcast bf16 tiles to fp32 before the dot -- exact, since bf16 products fit in fp32. Compiled kernels never do."""
    return triton_interpret() and x.dtype == torch.bfloat16


def _block_sizes(fp8: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); FP8 needs BLOCK_K = the 128 scale block."""
    if triton_interpret():
        return 32, 64, (128 if fp8 else 64), 4, 1
    return 64, 128, (128 if fp8 else 64), 4, 3


def _grouped_forward_triton(x_RK, w_EOK, counts_E, q: QuantizedWeight | None, pow2, transpose_w: bool):
    """y = x @ w[e]^T per group, or x @ w[e] when ``transpose_w`` (the activation gradient)."""
    r = x_RK.shape[0]
    e = counts_E.numel()
    block_m, block_n, block_k, warps, stages = _block_sizes(q is not None)
    tile_group, tile_row, group_end, _ = _tile_table(counts_E, block_m, r)
    if q is not None:
        x, x_s = quantize_act(x_RK, pow2=pow2, backend="triton")
        w, w_s = q.transposed() if transpose_w else (q.q, q.s)
        out_dtype = x_RK.dtype
    else:
        x, x_s = x_RK, x_RK.new_zeros(1, 1)
        w = w_EOK.transpose(1, 2) if transpose_w else w_EOK
        w_s = x_RK.new_zeros(1, 1, 1)
        out_dtype = x_RK.dtype
    o, k = w.shape[1], w.shape[2]
    y = torch.empty(r, o, dtype=out_dtype, device=x_RK.device)
    if r == 0 or e == 0:
        return y
    grid = (tile_group.numel(), triton.cdiv(o, block_n))
    _grouped_gemm_kernel[grid](
        x, w, y, x_s, w_s, tile_group, tile_row, group_end, o, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
        x_s.stride(0), x_s.stride(1), w_s.stride(0), w_s.stride(1), w_s.stride(2),
        FP8=q is not None, DOT_PREC=_dot_precision(x_RK), UPCAST=_upcast(x_RK),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


def _grouped_wgrad_triton(dy_RO, x_RK, counts_E, fp8: bool, pow2: bool) -> torch.Tensor:
    e, o, k = counts_E.numel(), dy_RO.shape[1], x_RK.shape[1]
    dw = torch.empty(e, o, k, dtype=torch.float32, device=x_RK.device)
    counts = counts_E.to(torch.int32)
    group_start = (torch.cumsum(counts_E, 0) - counts_E).to(torch.int32)
    bo, bk = (32, 64) if triton_interpret() else (64, 128)
    grid = (e, triton.cdiv(o, bo), triton.cdiv(k, bk))
    _grouped_wgrad_kernel[grid](
        dy_RO, x_RK, dw, group_start, counts, o, k,
        dy_RO.stride(0), dy_RO.stride(1), x_RK.stride(0), x_RK.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        FP8=fp8, POW2=pow2, DOT_PREC=_dot_precision(x_RK), UPCAST=_upcast(x_RK),
        BLOCK_R=BLOCK if fp8 else 64, BLOCK_O=bo, BLOCK_K=bk,
        # sm_90 (ptxas): 4 warps spill the FP8 variant's on-the-fly quantization (255 registers), and 3 stages of fp32
        # tiles need 216 of 227 KB shared memory; 8 warps and 2 stages leave both with room
        num_warps=4 if triton_interpret() else 8, num_stages=1 if triton_interpret() else 2,
    )  # fmt: skip
    return dw


# --------------------------------------------------------------------------------------------------------------------
# autograd + public entry
# --------------------------------------------------------------------------------------------------------------------


class _GroupedGemmFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RK, w_EOK, counts_E, q: QuantizedWeight | None, pow2: bool, triton_path: bool):
        if triton_path:
            y = _grouped_forward_triton(x_RK, w_EOK, counts_E, q, pow2, transpose_w=False)
        else:  # FP8 emulation on CPU (the bf16 torch path never reaches this Function)
            y = _fp8_forward_ref(x_RK, q, counts_E, pow2, transpose_w=False).to(x_RK.dtype)
        ctx.save_for_backward(x_RK, w_EOK, counts_E)
        ctx.q, ctx.pow2, ctx.triton_path = q, pow2, triton_path
        return y

    @staticmethod
    def backward(ctx, dy_RO):
        x_RK, w_EOK, counts_E = ctx.saved_tensors
        dy_RO = dy_RO.contiguous()
        q, pow2, fp8 = ctx.q, ctx.pow2, ctx.q is not None
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if ctx.triton_path:
                dx = _grouped_forward_triton(dy_RO, w_EOK, counts_E, q, pow2, transpose_w=True)
            else:
                dx = _fp8_forward_ref(dy_RO, q, counts_E, pow2, transpose_w=True)
            dx = dx.to(x_RK.dtype)
        if ctx.needs_input_grad[1]:
            if ctx.triton_path:
                dw = _grouped_wgrad_triton(dy_RO, x_RK, counts_E, fp8, pow2)
            else:
                dw = _wgrad_ref(dy_RO, x_RK, counts_E, fp8, pow2)
            dw = dw.to(w_EOK.dtype)
        return dx, dw, None, None, None, None


def quantize_experts(w_EOK: torch.Tensor, pow2: bool = False, backend: str = "auto") -> QuantizedWeight:
    """Per-expert 128x128-block fp8 copy: q [E, O, K], s [E, ceil(O/128), ceil(K/128)]."""
    e, o, k = w_EOK.shape
    if o % BLOCK == 0:  # blocks never straddle two experts: quantize the stack in one launch
        q, s = quantize_weight(w_EOK.reshape(e * o, k), pow2=pow2, backend=backend)
        return QuantizedWeight(q.view(e, o, k), s.view(e, o // BLOCK, -1))
    qs = [quantize_weight(w, pow2=pow2, backend=backend) for w in w_EOK]
    # autocast has no rule for float8 inputs: torch.stack of fp8 tensors under the trainer's bf16 autocast raises
    # ("Unexpected floating ScalarType in at::autocast::prioritize"); stacking is no computation, so autocast is off
    with torch.autocast(w_EOK.device.type, enabled=False):
        return QuantizedWeight(torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs]))


_CAST_CACHE = WeakIdKeyDictionary()  # tensor -> (key, cast copy); by identity (tensors compare elementwise)
_CACHING = [0]  # depth of ``caching_autocast_weights`` blocks


@contextlib.contextmanager
def caching_autocast_weights():
    """Inside: ``autocast_weight`` keeps its copies made without gradients, so the many decode steps of one
    ``generate`` (and an EP rank's dummy forwards) cast each expert stack once; leaving the outermost block drops them,
    so they never sit through a training step's peak memory. Outside, every forward casts afresh."""
    _CACHING[0] += 1
    try:
        yield
    finally:
        _CACHING[0] -= 1
        if not _CACHING[0]:
            _CAST_CACHE.clear()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype an autocast open for ``device_type`` computes in; None when none is (cpu and cuda only)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def caching_casts() -> bool:
    """Whether a ``caching_autocast_weights`` block is open (and a no-grad forward's casts are kept)."""
    return bool(_CACHING[0]) and not torch.is_grad_enabled()


def autocast_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` in the autocast dtype. With gradients enabled a fresh cast (part of the graph, as autocast casts
    ``nn.Linear`` weights); without, inside ``caching_autocast_weights`` (the rollout engine's decode under the
    trainer's autocast), the copy is kept per weight and version until the block ends, so no optimizer step (whose
    fused AdamW does not move the version counter) ever finds one to invalidate."""
    if w.dtype == dtype:
        return w
    if torch.is_grad_enabled() or hasattr(w, "ds_id") or not _CACHING[0]:
        # training forward: a fresh cast (a copy cached under inference mode cannot be saved for backward, even for
        # frozen experts under LoRA); ZeRO-3 weights are gathered per forward: nothing to keep; one-off no-grad
        # forwards (a teacher's scores, the rollout correction) keep nothing either
        return w.to(dtype)
    key = (w.data_ptr(), -1 if w.is_inference() else w._version, dtype)
    hit = _CAST_CACHE.get(w)
    if hit is None or hit[0] != key:
        hit = (key, w.detach().to(dtype))
        _CAST_CACHE[w] = hit
    return hit[1]


def invalidate_weight_caches(model: torch.nn.Module) -> None:
    """Drop the FP8 copies of ``model``'s weights (``FP8Linear.fp8_cache``, the experts' ``fp8_caches``). Call after
    any weight update: the caches key on version counters, which fused AdamW and ZeRO's writes through ``.data`` do
    not move. (The experts' autocast copies live only inside ``caching_autocast_weights``.)"""
    for module in model.modules():
        cache = getattr(module, "fp8_cache", None)
        for c in ([cache] if cache is not None else []) + list(getattr(module, "fp8_caches", None) or ()):
            c.invalidate()


def _torch_grouped_mm_wins(x_RK: torch.Tensor, w_EOK: torch.Tensor) -> bool:
    """On CUDA, torch's own grouped GEMM (CUTLASS) where it runs: bf16 with 16-byte aligned strides. On an H200 it
    ran the DeepSeek-V3 expert shapes 1.47x faster than our Triton bf16 kernel (docs/PERFORMANCE.md); fp32 (not
    supported there) and FP8 (block scales) stay on Triton."""
    from dsalign.kernels.moe import torch_grouped_mm_runs

    return x_RK.is_cuda and x_RK.dtype == torch.bfloat16 and torch_grouped_mm_runs(x_RK, w_EOK)


def grouped_gemm(
    x_RK: torch.Tensor,
    w_EOK: torch.Tensor,
    counts_E: torch.Tensor,
    fp8: bool = False,
    pow2: bool = False,
    cache: FP8WeightCache | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]^T`` for rows sorted by expert, differentiable in x and w.

    Args:
        x_RK: [R, K] rows grouped by expert; w_EOK: [E, O, K]; counts_E: [E] rows per expert (sum R).
        fp8: FP8 fwd/dgrad/wgrad (DeepSeek-V3 tiling); cache: reuse the experts' fp8 copy across calls.
        backend: "auto" (CUDA: torch's grouped GEMM for aligned bf16, Triton otherwise; CPU: torch), "triton" or
            "torch".
    """
    if x_RK.dim() != 2 or w_EOK.dim() != 3 or x_RK.shape[1] != w_EOK.shape[2] or counts_E.numel() != w_EOK.shape[0]:
        raise ValueError(
            f"grouped_gemm: expected x [R, K], w [E, O, K], counts [E]; got {tuple(x_RK.shape)}, "
            f"{tuple(w_EOK.shape)}, {tuple(counts_E.shape)}"
        )
    triton_path = use_triton(x_RK, backend)
    dtype = None if fp8 else autocast_dtype(x_RK.device.type)
    if dtype is not None:
        # autocast does not reach inside our Functions: cast here, as it casts nn.Linear's operands (the casts are
        # differentiable, so fp32 master weights still receive fp32 gradients); FP8 quantizes from any dtype
        x_RK, w_EOK = x_RK.to(dtype), autocast_weight(w_EOK, dtype)
    if not fp8 and (not triton_path or (backend == "auto" and _torch_grouped_mm_wins(x_RK, w_EOK))):
        from dsalign.kernels.moe import grouped_mm

        return grouped_mm(x_RK, w_EOK, counts_E)
    q = None
    if fp8:
        q = (cache or ExpertWeightCache()).get(w_EOK, pow2=pow2, backend="triton" if triton_path else "torch")
    return _GroupedGemmFn.apply(x_RK, w_EOK, counts_E, q, pow2, triton_path)


class ExpertWeightCache(FP8WeightCache):
    """FP8WeightCache for stacked [E, O, K] expert weights (one per projection of a MoE layer)."""

    def _quantize(self, weight: torch.Tensor, pow2: bool, backend: str) -> QuantizedWeight:
        return quantize_experts(weight, pow2=pow2, backend=backend)
