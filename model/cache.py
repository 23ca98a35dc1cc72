"""The MLA latent cache: per token per layer only the normalized latent c_kv and the roped shared key k_pe.

At 671B that is kv_lora_rank + qk_rope_head_dim = 512 + 64 = 576 values per token per layer (SPEC.md section 2),
against 128 x (192 + 128) for a naive per-head K/V cache.

Shape legend: L layers, B sequences (slots), S max cached tokens, C kv_lora_rank, R qk_rope_head_dim.
"""

from __future__ import annotations

import torch

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
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_dim = cfg.qk_rope_head_dim
        self.num_layers = cfg.num_hidden_layers if num_layers is None else num_layers
        self.max_len = max_len
        self.data = torch.zeros(
            self.num_layers, batch_size, max_len, self.kv_lora_rank + self.rope_dim, dtype=dtype, device=device
        )
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.data.shape[1]

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
        if valid_BT is None:
            b_idx, t_idx = (
                x.reshape(-1)
                for x in torch.meshgrid(
                    torch.arange(entry_BTK.shape[0], device=entry_BTK.device),
                    torch.arange(entry_BTK.shape[1], device=entry_BTK.device),
                    indexing="ij",
                )
            )
        else:
            b_idx, t_idx = valid_BT.nonzero(as_tuple=True)
        pos = position_ids_BT[b_idx, t_idx]
        if pos.numel() and int(pos.max()) >= self.max_len:
            raise ValueError(f"LatentCache: position {int(pos.max())} beyond max_len={self.max_len}")
        self.data[layer, b_idx, pos] = entry_BTK[b_idx, t_idx]

    def read(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first ``upto`` positions: c_kv [B, upto, C], k_pe [B, upto, R]."""
        block = self.data[layer, :, :upto]
        return block[..., : self.kv_lora_rank], block[..., self.kv_lora_rank :]
