"""FP8 block-scaled GEMM and the ``FP8Linear`` layer (DeepSeek-V3 section 3.3, docs/SPEC.md section 5).

Shape legend: M rows of the left operand (tokens), N output features, K the reduction dim, kb = ceil(K/128).

``fp8_gemm`` computes ``C[M, N] = A[M, K] @ B[N, K]^T`` from e4m3 operands with fine-grained scales:
``a_scale`` [M, kb] (1x128 tiles) and ``b_scale`` either [ceil(N/128), kb] (128x128 weight blocks) or [N, kb]
(1x128 tiles, for the weight-gradient GEMM whose operands are both activation-like). Each 128-wide K chunk is one
fp8 ``tl.dot`` whose fp32 result is multiplied by the chunk's two scales and added to an fp32 accumulator -- the
"promotion every 128 of K" that keeps the fp8 tensor-core accumulation error from growing with K.

``FP8Linear`` runs all three GEMMs of a linear layer in FP8:
  forward  y  = x  @ W^T   x: 1x128 tiles along K,    W: 128x128 blocks
  dgrad    dx = dy @ W     dy: 1x128 tiles along N,   W^T: the same 128x128 blocks, transposed
  wgrad    dW = dy^T @ x   dy^T, x^T: 1x128 tiles along M (tokens), so both scale grids follow the reduction dim
The master weight stays in its own dtype (fp32/bf16) and receives an fp32-accumulated gradient; its fp8 copy is cached
and only recomputed when the weight changes (``weight._version`` / ``data_ptr``), so generation does not requantize.
Without Triton (CPU), the same quantized math runs through ``fp8_gemm_ref`` (dequantize, then an fp32 matmul).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from dsalign.kernels._backend import HAS_TRITON, triton_interpret, use_triton
from dsalign.kernels.quant import BLOCK, FP8_DTYPE, FP8_MAX, dequantize_ref, quantize_act, quantize_weight

if HAS_TRITON:
    import triton
    import triton.language as tl


# --------------------------------------------------------------------------------------------------------------------
# torch references
# --------------------------------------------------------------------------------------------------------------------


def fp8_gemm_ref(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    b_block_rows: int = BLOCK,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference for ``fp8_gemm``: dequantize both operands exactly to fp32, then one fp32 matmul.

    Each fp8 x fp8 product is exact in fp32, so this differs from the chunked kernel only in fp32 summation order.
    """
    a = dequantize_ref(a_fp8, a_scale, 1, BLOCK)
    b = dequantize_ref(b_fp8, b_scale, b_block_rows, BLOCK)
    return (a @ b.t()).to(out_dtype)


def per_tensor_fp8_matmul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Baseline: one amax scale per tensor (the coarse recipe the fine-grained tiles replace). ``a @ b.T``, fp32."""

    def q(t: torch.Tensor) -> torch.Tensor:
        s = t.abs().amax().float().clamp_min(1e-4) / FP8_MAX
        return (t.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s

    return q(a) @ q(b).t()


# --------------------------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    def _autotune() -> bool:
        """``DSALIGN_AUTOTUNE=0`` keeps one config per kernel (the tests set it: every new shape would otherwise
        compile and time every config); read when this module is imported."""
        return os.environ.get("DSALIGN_AUTOTUNE", "1") != "0"

    def _gemm_configs() -> list:
        if triton_interpret():  # one small config: the interpreter is slow and autotuning would multiply it
            return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)]
        # (a 128x128 tile on 4 warps spills registers when compiled for sm_90: left out)
        shapes = [(128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (64, 64, 4, 4)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in (shapes if _autotune() else shapes[:1])
        ]

    @triton.jit
    def _tile_of_program(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row tile, column tile) of this program, in grouped launch order: GROUP_M row tiles share the same B
        columns while those are hot in L2."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        first_m = pid // (GROUP_M * num_n) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
        pid_n = (pid % (GROUP_M * num_n)) // group_size
        return pid_m, pid_n

    def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
        """Skip tiles far larger than the problem (decode-sized M, narrow N): fewer configs to compile and time."""
        m, n = named_args["M_BUCKET"], named_args["N"]
        keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m) and c.kwargs["BLOCK_N"] <= max(128, n)]
        return keep or configs[:1]

    @triton.autotune(
        configs=_gemm_configs(),
        key=["M_BUCKET", "N", "K", "B_SCALE_ROWS"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )
    @triton.jit
    def _fp8_gemm_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, M_BUCKET,
        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_asm, stride_ask, stride_bsn, stride_bsk,
        B_SCALE_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_n = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)

        # int64 row/column offsets: an operand past 2**31 elements (the wgrad's x^T at K x ~117k tokens) would
        # overflow int32 offset * stride products
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        as_ptrs = as_ptr + offs_m * stride_asm
        bs_ptrs = bs_ptr + (offs_n // B_SCALE_ROWS) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            a_s = tl.load(as_ptrs + kb * stride_ask, mask=m_ok, other=0.0)
            b_s = tl.load(bs_ptrs + kb * stride_bsk, mask=n_ok, other=0.0)
            # fp8 tensor-core dot over one 128-wide chunk, promoted into the fp32 accumulator with both scales
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    def _tma_configs() -> list:
        """Tile shapes for the TMA kernel; the pre-hook gives the host descriptors the chosen block shapes."""
        if triton_interpret():
            shapes = [(64, 64, 4, 1)]
        else:  # 128x128 on 4 warps, 256x128 and 64x256 spill registers on sm_90 (ptxas): left out
            shapes = [(128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (64, 128, 4, 5), (128, 256, 8, 3)]
            shapes = shapes if _autotune() else shapes[:1]
        return [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s, pre_hook=_tma_block_shapes
            )
            for bm, bn, w, s in shapes
        ]

    def _tma_block_shapes(nargs: dict) -> None:
        nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
        nargs["c_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"]]

    @triton.autotune(
        configs=_tma_configs(),
        key=["M_BUCKET", "N", "K", "B_SCALE_ROWS", "OUT_DTYPE"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )
    @triton.jit
    def _fp8_gemm_tma_kernel(
        a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K, M_BUCKET,
        stride_asm, stride_ask, stride_bsn, stride_bsk,
        B_SCALE_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        """The same GEMM with A, B and C moved by the tensor-memory-accelerator (Hopper's bulk copies): tiles arrive
        in shared memory without address arithmetic in the loop, out-of-bounds reads come back as zeros and
        out-of-bounds writes are dropped, so the loop carries no masks. Needs K-contiguous, 16-byte aligned A and B."""
        pid_m, pid_n = _tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
        bs_ptrs = bs_ptr + (offs_n // B_SCALE_ROWS).to(tl.int64) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([m0, kb * BLOCK_K])
            b = b_desc.load([n0, kb * BLOCK_K])
            a_s = tl.load(as_ptrs + kb * stride_ask, mask=m_ok, other=0.0)
            b_s = tl.load(bs_ptrs + kb * stride_bsk, mask=n_ok, other=0.0)
            acc += tl.dot(a, b.T) * a_s[:, None] * b_s[None, :]
        c_desc.store([m0, n0], acc.to(OUT_DTYPE))


def _check_gemm_args(a_fp8, a_scale, b_fp8, b_scale, b_block_rows) -> tuple[int, int, int]:
    if a_fp8.dim() != 2 or b_fp8.dim() != 2 or a_fp8.shape[1] != b_fp8.shape[1]:
        raise ValueError(f"fp8_gemm: expected A [M, K] and B [N, K], got {tuple(a_fp8.shape)}, {tuple(b_fp8.shape)}")
    if a_fp8.dtype != FP8_DTYPE or b_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm: operands must be {FP8_DTYPE}, got {a_fp8.dtype} and {b_fp8.dtype}")
    if b_block_rows not in (1, BLOCK):
        raise ValueError(f"fp8_gemm: b_block_rows must be 1 (1x128 tiles) or {BLOCK} (128x128 blocks)")
    (m, k), n = a_fp8.shape, b_fp8.shape[0]
    kb = -(-k // BLOCK)
    if tuple(a_scale.shape) != (m, kb) or tuple(b_scale.shape) != (-(-n // b_block_rows), kb):
        raise ValueError(
            f"fp8_gemm: scale grids {tuple(a_scale.shape)}, {tuple(b_scale.shape)} do not match A {tuple(a_fp8.shape)}"
            f" (needs {(m, kb)}) and B {tuple(b_fp8.shape)} (needs {(-(-n // b_block_rows), kb)})"
        )
    return m, n, k


KERNELS = ("auto", "cublas", "tma", "pointer")
# kernel="auto" sends products cuBLAS's blockwise recipe can run there (measured faster on an H200: PERFORMANCE.md)
AUTO_PREFERS_CUBLAS = True


def _tma_eligible(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need a contiguous last dim, 16-byte aligned base and row strides, and under 2**31 rows."""
    for t in tensors:
        size = t.element_size()
        if t.stride(1) != 1 or t.data_ptr() % 16 or (t.stride(0) * size) % 16 or max(t.shape) >= 2**31:
            return False
    return True


def cublas_blockwise_refusal(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    b_block_rows: int = BLOCK,
) -> str | None:
    """Why ``torch._scaled_mm``'s DeepSeek-style block scaling (cuBLAS, Hopper only) cannot run this product, or None.

    That path takes exactly this recipe -- A in 1x128 tiles, B in 128x128 blocks or 1x128 tiles, promotion to fp32 per
    128 of K (on an H200 its fp32 output matched our TMA kernel's error to 3 digits) -- on sm_90 with CUDA >= 12.9 and
    torch >= 2.9. Its operand rules as measured on an H200 (torch 2.11, CUDA 13), kept conservative here:
      K a multiple of 512: with 128x128 blocks and ceil(K/128) not a multiple of 4 (K = 128, 256, 384, 640) cuBLAS
        returned WRONG results without an error (relative error 0.2 to inf), so those never reach it;
      M a multiple of 4 (M = 1 and 17 failed with CUBLAS_STATUS_NOT_SUPPORTED; 4, 8, 100 ran); N a multiple of 128;
      A row-major, B [N, K] K-contiguous (passed as the column-major B^T); bf16 or fp32 output.
    """
    (m, k), n = a_fp8.shape, b_fp8.shape[0]
    if k % 512 or n % 128 or m % 4:
        return f"shape M={m} N={n} K={k} (needs M % 4, N % 128, K % 512 == 0)"
    if a_fp8.stride() != (k, 1) or b_fp8.stride() != (k, 1):
        return f"strides A {a_fp8.stride()} B {b_fp8.stride()} (needs both row-major [*, K])"
    if out_dtype not in (torch.bfloat16, torch.float32):
        return f"out_dtype {out_dtype}"
    if b_block_rows == BLOCK and not b_scale.is_contiguous():
        return "the 128x128 block scales are not contiguous"
    if not a_fp8.is_cuda:
        return "not on CUDA"
    return _cublas_blockwise_device_refusal(_device_index(a_fp8))


def _device_index(t: torch.Tensor) -> int:
    """The CUDA device ``t`` lives on (the current one for a bare "cuda"), for the per-device caches below."""
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@functools.cache
def _cublas_blockwise_device_refusal(device_index: int) -> str | None:
    """The device and build half of ``cublas_blockwise_refusal``, once per device."""
    capability = torch.cuda.get_device_capability(device_index)
    if capability != (9, 0):
        return f"compute capability {capability} is not sm_90"
    if not hasattr(torch.nn.functional, "scaled_mm"):  # the blockwise recipes arrived with it (torch 2.9)
        return f"torch {torch.__version__} has no blockwise _scaled_mm"
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    if cuda < (12, 9):
        return f"CUDA {torch.version.cuda} < 12.9"
    return None


def _fp8_gemm_cublas(a_fp8, a_scale, b_fp8, b_scale, b_block_rows, out_dtype) -> torch.Tensor:
    """``torch._scaled_mm`` with DeepSeek-style scales: cuBLAS wants 1x128 scale grids M-major (stride (1, M)) and
    the 128x128 grid as its [kb, N/128] transpose, with dequantization (multiplying) scales, as ours are."""

    def m_major(s: torch.Tensor) -> torch.Tensor:
        return s if s.stride(0) == 1 else s.t().contiguous().t()

    b_s = m_major(b_scale).t() if b_block_rows == 1 else b_scale.t()
    return torch._scaled_mm(a_fp8, b_fp8.t(), m_major(a_scale), b_s, out_dtype=out_dtype)


def _use_tma(a_fp8: torch.Tensor, b_fp8: torch.Tensor, c: torch.Tensor, kernel: str) -> bool:
    if kernel == "pointer":
        return False
    eligible = _tma_eligible(a_fp8, b_fp8, c)
    if kernel == "tma":
        if not eligible:
            raise ValueError(
                "fp8_gemm: kernel='tma' needs K-contiguous A and B and a row-major C with 16-byte aligned rows; got "
                f"strides {a_fp8.stride()}, {b_fp8.stride()}, {c.stride()} (use kernel='auto' or 'pointer')"
            )
        return True
    # auto: the bulk-copy engine exists from Hopper (sm_90) on; the interpreter runs the pointer kernel by default
    if not (eligible and c.is_cuda):
        return False
    return _has_tma(_device_index(c))


@functools.cache
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _m_bucket(m: int) -> int:
    """Autotuning key for the row count: the next power of two (at least 16), so that rollout's ever-changing batch
    sizes reuse a handful of tuned configs instead of re-benchmarking every config for every new M. Only a key: the
    kernels never read it."""
    return max(16, 1 << (m - 1).bit_length())


_TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def fp8_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    b_block_rows: int = BLOCK,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    kernel: str = "auto",
) -> torch.Tensor:
    """``C = (A * a_scale) @ (B * b_scale)^T`` with fp8 A [M, K], B [N, K] and fp32 scales; any M, N, K.

    Args:
        a_fp8: [M, K] e4m3; a_scale: [M, ceil(K/128)] fp32 (1x128 tiles).
        b_fp8: [N, K] e4m3 (any strides); b_scale: [ceil(N/b_block_rows), ceil(K/128)] fp32.
        b_block_rows: 128 for weight blocks, 1 for 1x128 tiles.
        out_dtype: bf16 or fp32 output.
        kernel: on the GPU path, which kernel: "tma" (our Triton kernel with bulk tensor copies, Hopper and later,
            aligned K-contiguous operands), "pointer" (our Triton kernel, any strides, any GPU), "cublas"
            (``torch._scaled_mm``'s blockwise recipe, sm_90, see ``cublas_blockwise_refusal``) or "auto": cuBLAS
            where it can run and ``AUTO_PREFERS_CUBLAS``, else TMA where it can run, else pointer.
    """
    m, n, k = _check_gemm_args(a_fp8, a_scale, b_fp8, b_scale, b_block_rows)
    if out_dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"fp8_gemm: out_dtype must be bf16/fp16/fp32, got {out_dtype}")
    if kernel not in KERNELS:
        raise ValueError(f"fp8_gemm: kernel must be one of {KERNELS}, got {kernel!r}")
    if not use_triton(a_fp8, backend):
        return fp8_gemm_ref(a_fp8, a_scale, b_fp8, b_scale, b_block_rows, out_dtype)
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=out_dtype, device=a_fp8.device)
    if kernel == "cublas" or (kernel == "auto" and AUTO_PREFERS_CUBLAS):
        refusal = cublas_blockwise_refusal(a_fp8, a_scale, b_fp8, b_scale, out_dtype, b_block_rows)
        if refusal is None:
            return _fp8_gemm_cublas(a_fp8, a_scale, b_fp8, b_scale, b_block_rows, out_dtype)
        if kernel == "cublas":
            raise ValueError(f"fp8_gemm: kernel='cublas' cannot run this product: {refusal}")
    c = torch.empty(m, n, dtype=out_dtype, device=a_fp8.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if _use_tma(a_fp8, b_fp8, c, kernel):
        from triton.tools.tensor_descriptor import TensorDescriptor

        # placeholder block shapes: the autotuner's pre-hook sets the chosen config's before each launch
        a_desc = TensorDescriptor.from_tensor(a_fp8, [BLOCK, BLOCK])
        b_desc = TensorDescriptor.from_tensor(b_fp8, [BLOCK, BLOCK])
        c_desc = TensorDescriptor.from_tensor(c, [BLOCK, BLOCK])
        _fp8_gemm_tma_kernel[grid](
            a_desc, b_desc, c_desc, a_scale, b_scale, m, n, k, _m_bucket(m),
            a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
            B_SCALE_ROWS=b_block_rows, BLOCK_K=BLOCK, OUT_DTYPE=getattr(tl, _TL_DTYPES[out_dtype]),
        )  # fmt: skip
        return c
    _fp8_gemm_kernel[grid](
        a_fp8, b_fp8, c, a_scale, b_scale, m, n, k, _m_bucket(m),
        a_fp8.stride(0), a_fp8.stride(1), b_fp8.stride(0), b_fp8.stride(1), c.stride(0), c.stride(1),
        a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        B_SCALE_ROWS=b_block_rows, BLOCK_K=BLOCK,
    )  # fmt: skip
    return c


# --------------------------------------------------------------------------------------------------------------------
# FP8Linear: autograd function, weight cache, module
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """A weight's 128x128-block fp8 copy, and its transpose for the activation-gradient GEMM."""

    q: torch.Tensor  # [N, K] e4m3 ([E, N, K] for stacked experts)
    s: torch.Tensor  # [ceil(N/128), ceil(K/128)] fp32 ([E, ...] for stacked experts)
    q_t: torch.Tensor | None = None  # [K, N] e4m3, contiguous (K-major operand for dgrad)
    s_t: torch.Tensor | None = None
    deq: dict | None = None  # dtype -> the dequantized weight, for code that reads the weight (absorbed MLA decode)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the FP8 GEMMs apply (``q * s`` per 128x128 block), made once per quantization."""
        if self.deq is None:
            self.deq = {}
        if dtype not in self.deq:
            self.deq[dtype] = dequantize_ref(self.q, self.s, BLOCK, BLOCK, dtype)
        return self.deq[dtype]

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_t is None:
            # 128x128 blocks are symmetric: quantizing W^T gives exactly the transposed bytes and scales
            self.q_t, self.s_t = self.q.transpose(-1, -2).contiguous(), self.s.transpose(-1, -2).contiguous()
        return self.q_t, self.s_t


class FP8WeightCache:
    """Holds one weight's fp8 copy; requantizes when the weight's storage, version, dtype or shape changed.

    In-place updates (optimizer steps, ``load_state_dict``) bump ``weight._version``; a new tensor changes
    ``data_ptr``. Writes through ``weight.data`` bypass the version counter: call ``invalidate()`` after those.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: QuantizedWeight | None = None
        self.refreshes = 0

    def get(self, weight: torch.Tensor, pow2: bool = False, backend: str = "auto") -> QuantizedWeight:
        # an inference tensor (made under torch.inference_mode) has no version counter and cannot change in place
        version = -1 if weight.is_inference() else weight._version
        key = (weight.data_ptr(), version, weight.dtype, tuple(weight.shape), weight.device, pow2, backend)
        if key != self._key:
            with torch.no_grad():
                self._key, self._value = key, self._quantize(weight.detach(), pow2, backend)
            self.refreshes += 1
        return self._value

    def _quantize(self, weight: torch.Tensor, pow2: bool, backend: str) -> QuantizedWeight:
        return QuantizedWeight(*quantize_weight(weight, pow2=pow2, backend=backend))

    def invalidate(self) -> None:
        self._key, self._value = None, None


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, qweight: QuantizedWeight, pow2: bool, backend: str):
        in_shape = x.shape
        x_MK = x.reshape(-1, in_shape[-1])
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32
        x_fp8, x_s = quantize_act(x_MK, pow2=pow2, backend=backend)
        y = fp8_gemm(x_fp8, x_s, qweight.q, qweight.s, BLOCK, out_dtype=out_dtype, backend=backend)
        if bias is not None:
            y = y + bias.to(y.dtype)
        # wgrad reduces over tokens: keep x^T in fp8 with 1x128 tiles along M (half the memory of bf16 x)
        xt_fp8, xt_s = quantize_act(x_MK.t(), pow2=pow2, backend=backend) if ctx.needs_input_grad[1] else (None, None)
        ctx.save_for_backward(xt_fp8, xt_s)
        ctx.qweight, ctx.pow2, ctx.backend = qweight, pow2, backend
        ctx.in_shape, ctx.x_dtype, ctx.w_dtype = in_shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        return y.view(*in_shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xt_fp8, xt_s = ctx.saved_tensors
        dy_MN = dy.reshape(-1, dy.shape[-1])
        pow2, backend = ctx.pow2, ctx.backend
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dy_fp8, dy_s = quantize_act(dy_MN, pow2=pow2, backend=backend)
            w_t, s_t = ctx.qweight.transposed()
            out_dtype = ctx.x_dtype if ctx.x_dtype in (torch.bfloat16, torch.float32) else torch.float32
            dx = fp8_gemm(dy_fp8, dy_s, w_t, s_t, BLOCK, out_dtype=out_dtype, backend=backend)
            dx = dx.view(ctx.in_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dyt_fp8, dyt_s = quantize_act(dy_MN.t(), pow2=pow2, backend=backend)
            dw = fp8_gemm(dyt_fp8, dyt_s, xt_fp8, xt_s, 1, out_dtype=torch.float32, backend=backend)
            dw = dw.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_MN.float().sum(0).to(ctx.w_dtype)
        return dx, dw, db, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    cache: FP8WeightCache | None = None,
    pow2: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the forward, dgrad and wgrad GEMMs in FP8 (see module docstring).

    Args:
        x: [..., K] activations (bf16/fp32). weight: [N, K] master weight. bias: [N] or None.
        cache: reuse the weight's fp8 copy across calls (pass the same cache for the same weight).
        pow2: power-of-two (ue8m0) scales.
    """
    qweight = (cache or FP8WeightCache()).get(weight, pow2=pow2, backend=backend)
    return _FP8LinearFn.apply(x, weight, bias, qweight, pow2, backend)


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose GEMMs run in FP8 with DeepSeek-V3's fine-grained scaling; a drop-in for the model's
    linear layers when ``ModelConfig.fp8`` is set (embedding, head, gate, norms and attention core stay bf16/fp32).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, pow2: bool = False,
                 backend: str = "auto", device=None, dtype=None) -> None:  # fmt: skip
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.pow2, self.backend = pow2, backend
        self.fp8_cache = FP8WeightCache()

    @classmethod
    def from_linear(cls, linear: nn.Linear, pow2: bool = False, backend: str = "auto") -> FP8Linear:
        """An FP8Linear sharing ``linear``'s parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.pow2, new.backend, new.fp8_cache = pow2, backend, FP8WeightCache()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, cache=self.fp8_cache, pow2=self.pow2, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=e4m3 1x128/128x128, pow2={self.pow2}"
