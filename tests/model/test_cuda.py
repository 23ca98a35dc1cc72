"""The model, training step and rollout on CUDA, where every projection and expert GEMM runs the Triton kernels.

Marked ``gpu``: skipped without CUDA (CPU runs cover the torch paths and, under the interpreter, the kernels alone).
Each test compares the CUDA run against a reference with a stated tolerance and prints the measured error.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from dsalign.model import Transformer, causal_lm_loss, load_checkpoint

from .conftest import YARN, hf_reference, tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 parity: cuBLAS and our Triton kernels in full fp32 (the Triton fp32 dots are 'ieee' already)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_fp32_model_on_cuda_matches_transformers(tmp_path):
    """The Triton grouped-GEMM experts inside the full model vs transformers' DeepseekV3ForCausalLM, fp32 on CUDA."""
    cfg = tiny(rope_scaling=YARN)
    ref = hf_reference(cfg)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_checkpoint(tmp_path / "hf").eval().cuda()
    ref = ref.cuda()
    x = torch.randint(0, cfg.vocab_size, (3, 40), device="cuda")
    with torch.no_grad():
        want, got = ref(x).logits, ours(x).logits
    err = (want - got).abs().max().item()
    print(f"fp32 CUDA vs transformers: max |dlogit| = {err:.2e}")
    assert err <= 1e-4


@contextlib.contextmanager
def gemm_noise(rel: float, seed: int = 0):
    """Every ``fp8_gemm`` output (the FP8 linears; not the grouped expert kernels) times ``1 + rel * N(0, 1)``: a
    perturbation the size of the fp8 tensor cores' accumulation error (``rel = 2**-13``), to measure how far that
    alone moves a model's outputs (leaving the experts out makes the yardstick, hence the bound, stricter)."""
    import dsalign.kernels.fp8_gemm as fg

    original, g = fg.fp8_gemm, torch.Generator().manual_seed(seed)

    def noisy(*args, **kwargs):
        out = original(*args, **kwargs)
        noise = torch.randn(out.shape, generator=g).to(out.device)
        return (out.float() * (1 + rel * noise)).to(out.dtype)

    fg.fp8_gemm = noisy
    try:
        yield
    finally:
        fg.fp8_gemm = original


ACCUMULATION_NOISE = 2.0**-13  # ~14-bit accumulation inside an fp8 wgmma (DeepSeek-V3 section 3.3.2)


def fp8_step_errors(device: str) -> dict[str, float]:
    """One FP8 forward + backward on ``device`` vs the CPU torch emulation, beside two yardsticks measured on the
    emulation itself: the same step with accumulation-sized noise on every FP8 GEMM, and the fp32 model."""
    cfg = tiny(fp8=True, first_k_dense_replace=3, num_nextn_predict_layers=0)  # no MoE anywhere (the MTP block is)
    torch.manual_seed(0)
    ref = Transformer(cfg).train()
    models = {"emulation": (ref, "cpu", 0.0), "noisy": (Transformer(cfg).train(), "cpu", ACCUMULATION_NOISE),
              "device": (Transformer(cfg).train(), device, 0.0), "fp32": (Transformer(cfg.replace(fp8=False)).train(),
              "cpu", 0.0)}  # fmt: skip
    x = torch.randint(0, cfg.vocab_size, (4, 48))
    out = {}
    for name, (model, dev, noise) in models.items():
        model.load_state_dict(ref.state_dict())
        model.to(dev)
        with gemm_noise(noise) if noise else contextlib.nullcontext():
            res = model(x.to(dev))
            loss, _ = causal_lm_loss(res, x.to(dev), mtp_lambda=0.3)
            loss.backward()
        names = sorted(n for n, p in model.named_parameters() if p.grad is not None)
        grads = torch.cat([dict(model.named_parameters())[n].grad.detach().cpu().flatten() for n in names])
        out[name] = (res.logits.detach().cpu(), loss.item(), grads)
    base = out["emulation"]
    errors = {}
    for name in ("noisy", "device", "fp32"):
        logits, loss, grads = out[name]
        errors[f"{name}_logits"], errors[f"{name}_grads"] = _rel(logits, base[0]), _rel(grads, base[2])
        errors[f"{name}_loss"] = abs(loss - base[1]) / abs(base[1])
    return errors


def test_fp8_training_step_on_cuda_matches_cpu_emulation():
    """FP8 forward + backward on CUDA (Triton quantizers and FP8 GEMMs) against the CPU torch emulation of the same
    recipe. The quantizers agree bit for bit, the GEMMs do not: Hopper's fp8 tensor cores accumulate with ~14 bits
    inside each 128-wide chunk, and a small model of random weights in FP8 is very sensitive to that (a relative
    perturbation of 1e-5 on its GEMM outputs already moves the CPU emulation's logits by ~1.5%: e4m3 roundings
    flip). So the yardstick is measured, not assumed: CUDA may differ from the emulation by at most twice what
    accumulation-sized noise on every GEMM does to the emulation itself, and by less than FP8 differs from fp32.
    Seen on an H200 (2026-12-04): logits 1.6e-2 from the emulation vs 3.6e-2 for FP8 vs fp32. Dense layers: with
    MoE layers such differences also flip near-tied expert choices of a random model (measuring router margins,
    not kernels; the expert kernels are compared alone in tests/kernels)."""
    e = fp8_step_errors("cuda")
    print("FP8 CUDA vs CPU emulation: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(e.items())))
    assert e["device_logits"] <= 2 * e["noisy_logits"] + 1e-3 and e["device_logits"] < e["fp32_logits"]
    assert e["device_grads"] <= 2 * e["noisy_grads"] + 1e-3 and e["device_grads"] < e["fp32_grads"]
    assert e["device_loss"] < 1e-2


def rollout_vs_training(device: str, fp8: bool) -> dict[str, float]:
    """|log-prob| gaps (worst and mean) between the engine's sampled tokens and the training forward on the same
    sequences, and those that accumulation-sized GEMM noise alone opens in that forward (0 without FP8)."""
    from dsalign.alignment.rollout import RolloutEngine
    from dsalign.alignment.sampling_params import SamplingParams

    torch.manual_seed(1)
    model = Transformer(tiny(fp8=fp8)).eval().to(device)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 6, 1, 12)]
    sp = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, seed=5, ignore_eos=True, n=2)
    out = RolloutEngine(model, max_batch_size=4, max_len=64).generate(prompts, sp)

    def forward_logps(c) -> torch.Tensor:
        full = torch.tensor([c.prompt_ids + c.token_ids], device=device)
        logits = model(full).logits[0].float() / 0.7
        P, L = len(c.prompt_ids), len(c.token_ids)
        tok = torch.tensor(c.token_ids, device=device)[:, None]
        return torch.log_softmax(logits[P - 1 : P + L - 1], dim=-1).gather(1, tok)[:, 0].cpu()

    gaps, noise = [], []
    with torch.no_grad():
        for c in out:
            want = forward_logps(c)
            gaps.append((want - torch.tensor(c.logprobs)).abs())
            if fp8:
                with gemm_noise(ACCUMULATION_NOISE):
                    noise.append((forward_logps(c) - want).abs())
    gap, yard = torch.cat(gaps), torch.cat(noise) if noise else torch.zeros(1)
    return {"worst": gap.max().item(), "mean": gap.mean().item(), "noise_worst": yard.max().item(),
            "noise_mean": yard.mean().item()}  # fmt: skip


@pytest.mark.parametrize("fp8", [False, True])
def test_rollout_logprobs_match_training_forward_on_cuda(fp8):
    """The promise of one model code path: sampled tokens' log-probs from the engine (cached, batched decode) equal
    the training forward's on the same sequences. fp32: <= 1e-4. FP8: the absorbed decode applies the same
    dequantized fp8 weight and quantized latent as the training forward (on CPU they agree to 2e-6,
    tests/rollout/test_engine.py), but on CUDA the forward's kv_b GEMM accumulates fp8 products with the tensor
    cores' reduced precision while decode's einsums are fp32. A relative perturbation of 1e-5 already flips e4m3
    roundings in this model (mean |d logp| ~1e-2 on CPU), so the gap may be up to twice (worst and mean) what
    accumulation-sized noise on every GEMM opens in the forward alone. This bounds the CUDA gap by the recipe's own
    noise; it cannot tell a small systematic error from it (before decode used the fp8 weight the H200 gap was
    0.34 worst, after 0.11, against ~0.3 for the noise): the exact CPU test is what catches those."""
    e = rollout_vs_training("cuda", fp8)
    print(f"rollout vs training log-probs on CUDA (fp8={fp8}): " + ", ".join(f"{k} {v:.2e}" for k, v in e.items()))
    if fp8:
        assert e["worst"] <= 2 * e["noise_worst"] + 1e-4 and e["mean"] <= 2 * e["noise_mean"] + 1e-5
    else:
        assert e["worst"] <= 1e-4
