"""Blocked causal attention vs torch's SDPA (``is_causal=True``): outputs and q/k/v gradients on ordinary and odd
shapes (T not divisible by the blocks, fewer tokens than blocks, V head dim != K head dim)."""

import pytest
import torch
from dsalign.kernels.causal_attention import blocked_causal_attention, causal_attention_ref


def _out_and_grads(fn, q, k, v, do):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


SHAPES = [(2, 3, 64, 24, 16), (1, 2, 37, 12, 12), (3, 1, 3, 8, 5), (1, 4, 130, 96, 64)]  # B, H, T, K, V


@pytest.mark.parametrize("B, H, T, K, V", SHAPES)
@pytest.mark.parametrize("num_blocks", [1, 4, 7])
def test_matches_sdpa(B, H, T, K, V, num_blocks):
    torch.manual_seed(0)
    q, k = torch.randn(B, H, T, K), torch.randn(B, H, T, K)
    v, do = torch.randn(B, H, T, V), torch.randn(B, H, T, V)
    scale = K**-0.5 * 2  # peaked attention
    got = _out_and_grads(lambda q, k, v: blocked_causal_attention(q, k, v, scale, num_blocks), q, k, v, do)
    ref = _out_and_grads(lambda q, k, v: causal_attention_ref(q, k, v, scale), *(t.double() for t in (q, k, v, do)))
    for g, r, what in zip(got, ref, ("out", "dq", "dk", "dv")):
        assert g.dtype == torch.float32 and g.shape == r.shape
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-4, msg=lambda m, what=what: f"{what}: {m}")


def test_future_tokens_have_no_influence():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 6)
    o = blocked_causal_attention(q, k, v, 0.3)
    k2, v2 = k.clone(), v.clone()
    k2[..., 11:, :], v2[..., 11:, :] = 5.0, -5.0
    torch.testing.assert_close(blocked_causal_attention(q, k2, v2, 0.3)[..., :11, :], o[..., :11, :])
    with pytest.raises(ValueError, match="expected q, k"):
        blocked_causal_attention(q, k[..., :10, :], v, 0.3)
