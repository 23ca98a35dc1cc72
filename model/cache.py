"""The MLA latent cache: per token per layer only the normalized latent c_kv and the roped shared key k_pe.

At 671B that is kv_lora_rank + qk_rope_head_dim = 512 + 64 = 576 values per token per layer (docs/SPEC.md section 2),
against 128 x (192 + 128) for a naive per-head K/V cache.

Shape legend: L layers, B sequences (slots), S max cached tokens, C kv_lora_rank, R qk_rope_head_dim.
"""

from __future__ import annotations

import copy

import torch
from dsalign.kernels.quant import scale_from_amax

from .config import ModelConfig


class LatentCache:
    """Preallocated ``[L, B, S, C + R]`` buffer plus per-sequence lengths.

    Sequence ``b`` occupies positions ``0 .. lengths[b] - 1``; new tokens are written at their position ids, so
    ragged batches work: garbage beyond a sequence's length (right padding) is never attended, since a query at
    position p only sees keys at positions <= p.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        num_layers: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self._init_dims(cfg, batch_size, max_len, num_layers, device)
        self.data = torch.zeros(
            self.num_layers, batch_size, max_len, self.kv_lora_rank + self.rope_dim, dtype=dtype, device=device
        )

    def _init_dims(self, cfg: ModelConfig, batch_size: int, max_len: int, num_layers: int | None, device) -> None:
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_dim = cfg.qk_rope_head_dim
        self.num_layers = cfg.num_hidden_layers if num_layers is None else num_layers
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._plan: tuple | None = None

    def plan_writes(self, position_ids_BT: torch.Tensor | None, valid_BT: torch.Tensor | None = None) -> None:
        """Compute the write slots of one forward once (``Transformer.forward`` calls this before its layers and
        clears it after): every layer writes the same tokens, and each computation has two host syncs on CUDA
        (``nonzero``, the bounds check), i.e. two per layer per decode step without the plan."""
        self._plan = None
        if position_ids_BT is not None:
            self._plan = (position_ids_BT, valid_BT, self._compute_slots(position_ids_BT, valid_BT))

    def _slots(
        self, position_ids_BT: torch.Tensor, valid_BT: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        plan = getattr(self, "_plan", None)
        if plan is not None and plan[0] is position_ids_BT and plan[1] is valid_BT:
            return plan[2]
        return self._compute_slots(position_ids_BT, valid_BT)

    def _compute_slots(
        self, position_ids_BT: torch.Tensor, valid_BT: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch index, token index, cache position) of every token to write; padding tokens are left out."""
        if valid_BT is None:
            valid_BT = torch.ones(position_ids_BT.shape, dtype=torch.bool, device=position_ids_BT.device)
        b_idx, t_idx = valid_BT.nonzero(as_tuple=True)
        pos = position_ids_BT[b_idx, t_idx]
        if pos.numel() and int(pos.max()) >= self.max_len:
            raise ValueError(f"LatentCache: position {int(pos.max())} beyond max_len={self.max_len}")
        return b_idx, t_idx, pos

    @property
    def batch_size(self) -> int:
        return self.data.shape[1]

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype ``read`` returns the latents in."""
        return self.data.dtype

    def values_per_token_per_layer(self) -> int:
        return self.data.shape[-1]

    def bytes_per_token(self) -> int:
        """Bytes one cached token costs across all layers."""
        return self.num_layers * self.data.shape[-1] * self.data.element_size()

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Free sequences (all when ``rows`` is None) so their slots can take new requests."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, device=self.lengths.device)] = 0

    def write(
        self,
        layer: int,
        c_kv_BTC: torch.Tensor,
        k_pe_BTR: torch.Tensor,
        position_ids_BT: torch.Tensor,
        valid_BT: torch.Tensor | None = None,
    ) -> None:
        """Store the latents of the (valid) new tokens at their positions; padding tokens are not written."""
        entry_BTK = torch.cat([c_kv_BTC, k_pe_BTR], dim=-1).to(self.data.dtype)
        b_idx, t_idx, pos = self._slots(position_ids_BT, valid_BT)
        self.data[layer, b_idx, pos] = entry_BTK[b_idx, t_idx]

    def read(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first ``upto`` positions: c_kv [B, upto, C], k_pe [B, upto, R]."""
        block = self.data[layer, :, :upto]
        return block[..., : self.kv_lora_rank], block[..., self.kv_lora_rank :]

    def buffers(self) -> list[torch.Tensor]:
        """Every storage tensor, each laid out ``[L, B, S, ...]`` (what ``copy_rows`` moves)."""
        return [self.data]

    _BUFFERS = ("data",)  # the attributes ``buffers`` returns, in order

    def first_rows(self, n: int) -> LatentCache:
        """A cache over rows ``0 .. n-1`` sharing this one's memory: what it writes, and the lengths it advances,
        land here. Lets a decode step run only the rows that hold sequences (see ``RolloutEngine._compact``)."""
        view = copy.copy(self)
        for name in self._BUFFERS:
            setattr(view, name, getattr(self, name)[:, :n])
        view.lengths = self.lengths[:n]
        return view

    def copy_rows(self, src: LatentCache, src_row: int, dst_row: int, length: int) -> None:
        """Copy the first ``length`` cached positions of ``src``'s row into this cache's row (same cache type);
        sets the row's length. Used to share one prompt prefill between several samples."""
        if type(src) is not type(self) or src.num_layers != self.num_layers:
            raise ValueError(
                f"copy_rows: {type(src).__name__} ({src.num_layers} layers) into {type(self).__name__} "
                f"({self.num_layers} layers)"
            )
        if length > self.max_len:
            raise ValueError(f"copy_rows: {length} positions do not fit max_len={self.max_len}")
        for dst_buf, src_buf in zip(self.buffers(), src.buffers()):
            dst_buf[:, dst_row, :length] = src_buf[:, src_row, :length]
        self.lengths[dst_row] = length


class FP8LatentCache(LatentCache):
    """Latent cache with ``c_kv`` in e4m3 (one fp32 scale per token per 128 channels) and ``k_pe`` in bf16.

    FlashMLA's FP8 layout: 512 + 4 x 4 + 64 x 2 = 656 bytes per token per layer at 671B instead of 1152 in bf16.
    The latent is RMS-normalized, so per-tile amax scaling loses little; the rotary key stays in bf16 because
    its position-dependent rotation makes it the more precision-sensitive half. ``read`` dequantizes into the
    model's compute dtype.
    """

    FP8_MAX = 448.0

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        num_layers: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self._init_dims(cfg, batch_size, max_len, num_layers, device)
        self.tile = min(128, self.kv_lora_rank)
        # an FP8 model with power-of-two scales caches latents already quantized that way (MLA._as_kv_b_input):
        # the same scale rule re-quantizes them exactly, amax/448 would round them a second time
        self.pow2 = bool(cfg.fp8 and cfg.fp8_pow2_scales)
        if self.kv_lora_rank % self.tile:
            raise ValueError(f"FP8LatentCache: kv_lora_rank={self.kv_lora_rank} is not a multiple of 128")
        shape = (self.num_layers, batch_size, max_len)
        self.c_kv = torch.zeros(*shape, self.kv_lora_rank, dtype=torch.float8_e4m3fn, device=device)
        self.scale = torch.ones(*shape, self.kv_lora_rank // self.tile, dtype=torch.float32, device=device)
        self.k_pe = torch.zeros(*shape, self.rope_dim, dtype=torch.bfloat16, device=device)
        self.compute_dtype = dtype

    @property
    def batch_size(self) -> int:
        return self.c_kv.shape[1]

    @property
    def latent_dtype(self) -> torch.dtype:
        return self.compute_dtype

    def values_per_token_per_layer(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    def bytes_per_token(self) -> int:
        per_layer = sum(b.shape[-1] * b.element_size() for b in self.buffers())
        return self.num_layers * per_layer

    _BUFFERS = ("c_kv", "scale", "k_pe")

    def buffers(self) -> list[torch.Tensor]:
        return [self.c_kv, self.scale, self.k_pe]

    def write(self, layer, c_kv_BTC, k_pe_BTR, position_ids_BT, valid_BT=None) -> None:
        b_idx, t_idx, pos = self._slots(position_ids_BT, valid_BT)
        c_NGt = c_kv_BTC[b_idx, t_idx].float().unflatten(-1, (-1, self.tile))
        scale_NG = scale_from_amax(c_NGt.abs().amax(dim=-1), self.pow2)
        self.c_kv[layer, b_idx, pos] = (c_NGt / scale_NG[..., None]).to(torch.float8_e4m3fn).flatten(-2)
        self.scale[layer, b_idx, pos] = scale_NG
        self.k_pe[layer, b_idx, pos] = k_pe_BTR[b_idx, t_idx].to(torch.bfloat16)

    def read(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        c_BSGt = self.c_kv[layer, :, :upto].to(torch.float32).unflatten(-1, (-1, self.tile))
        c_kv = (c_BSGt * self.scale[layer, :, :upto, :, None]).flatten(-2).to(self.compute_dtype)
        return c_kv, self.k_pe[layer, :, :upto].to(self.compute_dtype)
