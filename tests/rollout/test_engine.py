"""Acceptance 1, 2 and the engine's scheduling, sampling knobs, FP8 cache and weight updates (tiny model, fp32)."""

from __future__ import annotations

import pytest
import torch
from dsalign.alignment.rollout import RolloutEngine
from dsalign.alignment.sampling_params import SamplingParams
from dsalign.model import FP8LatentCache, LatentCache, ModelConfig

from .conftest import ByteTokenizer, tiny_model

PROMPT_LENS = (3, 9, 6, 1, 12)


def _prompts(vocab: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lens]


def _argmax_reference(model, prompt: list[int], steps: int) -> list[int]:
    """Step-by-step argmax of the full forward (no cache): the definition greedy decoding must reproduce."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_equals_full_forward_argmax_ragged(speculative):
    model = tiny_model()
    prompts = _prompts(model.cfg.vocab_size)
    # per-prompt lengths so slots free at different steps and waiting prompts get admitted mid-run
    params = [SamplingParams(max_new_tokens=m, temperature=0, ignore_eos=True) for m in (12, 4, 9, 7, 5)]
    engine = RolloutEngine(model, max_batch_size=3, max_len=64, speculative=speculative)
    out = engine.generate(prompts, params)
    assert [c.request_index for c in out] == list(range(5))
    for c, p in zip(out, params):
        assert c.token_ids == _argmax_reference(model, c.prompt_ids, p.max_new_tokens), c.request_index
        assert c.finish_reason == "length"
    if speculative:  # each completion counts its own drafts: they add up to the call's
        assert engine.last_stats.drafted > 0
        assert sum(c.drafted for c in out) == engine.last_stats.drafted
        assert sum(c.accepted for c in out) == engine.last_stats.accepted
        assert all(0 <= c.accepted <= c.drafted < len(c.token_ids) for c in out)
    else:
        assert all(c.drafted == c.accepted == 0 for c in out)


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_logprobs_match_training_forward(speculative, fp8):
    """Also with FP8 GEMMs: the absorbed decode reads kv_b_proj's dequantized fp8 weight and a cached latent
    quantized as kv_b_proj quantizes its input, so it computes the training forward's FP8 math (it used the master
    weight and the raw latent: log-probs 0.3 apart)."""
    model = tiny_model(seed=1, fp8=fp8)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # peaked distributions: a wrong position or temperature shows up clearly
    prompts = _prompts(model.cfg.vocab_size, seed=1)
    temperature = 0.7
    sp = SamplingParams(max_new_tokens=10, temperature=temperature, top_k=20, top_p=0.9, seed=5, ignore_eos=True, n=2)
    engine = RolloutEngine(model, max_batch_size=4, max_len=64, speculative=speculative)
    out = engine.generate(prompts, sp)
    assert len(out) == 2 * len(prompts)
    worst = 0.0
    with torch.no_grad():
        for c in out:
            full = torch.tensor([c.prompt_ids + c.token_ids])
            logits = model(full).logits[0].float() / temperature
            P, L = len(c.prompt_ids), len(c.token_ids)
            want = torch.log_softmax(logits[P - 1 : P + L - 1], dim=-1).gather(1, torch.tensor(c.token_ids)[:, None])
            got = torch.tensor(c.logprobs)
            assert got.shape == (L,)
            worst = max(worst, (want[:, 0] - got).abs().max().item())
    assert worst <= 1e-5


def test_samples_share_prefill_and_seeds_reproduce():
    model = tiny_model()
    prompts = _prompts(model.cfg.vocab_size)
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=11, ignore_eos=True)
    engine = RolloutEngine(model, max_batch_size=4, max_len=64)
    out = engine.generate(prompts, sp)
    assert engine.last_stats.prefill_tokens == sum(PROMPT_LENS)  # once per prompt, not per sample
    assert [(c.request_index, c.sample_index) for c in out] == [(r, j) for r in range(5) for j in range(3)]
    # the same seeded request alone, in a different batch layout, samples the same tokens
    alone = RolloutEngine(model, max_batch_size=2, max_len=64).generate([prompts[2]], sp)
    assert [c.token_ids for c in alone] == [c.token_ids for c in out if c.request_index == 2]
    assert len({tuple(c.token_ids) for c in out if c.request_index == 2}) > 1  # samples differ from each other


def test_continuous_batching_refills_freed_slots():
    model = tiny_model()
    prompts = _prompts(model.cfg.vocab_size)
    params = [SamplingParams(max_new_tokens=m, temperature=0, ignore_eos=True) for m in (20, 2, 2, 2, 2)]
    engine = RolloutEngine(model, max_batch_size=2, max_len=64)
    engine.generate(prompts, params)
    # the straggler needs 19 decode steps (its first token comes from the prefill); the four short requests run
    # in the other slot meanwhile. Static batches of 2 would need 19 + 1 + 1 steps.
    assert engine.last_stats.decode_steps == 19


def test_stop_token_and_stop_string():
    model = tiny_model()
    tok = ByteTokenizer()
    prompt = _prompts(model.cfg.vocab_size)[1]
    engine = RolloutEngine(model, tok, max_batch_size=2, max_len=64)
    base = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))[0]
    assert base.text == tok.decode(base.token_ids)
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    c = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[stop_id]))[0]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop_id)
    assert c.token_ids == base.token_ids[: first + 1]  # the stop token is kept (the trainer learns to stop)
    stop = tok.decode(base.token_ids[6:8])
    c = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, stop=[stop], ignore_eos=True))[0]
    cut = base.text.index(stop)
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", stop, base.text[:cut])
    assert c.token_ids == base.token_ids[: len(c.token_ids)] and len(c.token_ids) <= 8
    assert len(c.logprobs) == len(c.token_ids)


def test_eos_from_config_stops_unless_ignored():
    model = tiny_model()
    prompt = _prompts(model.cfg.vocab_size)[0]
    engine = RolloutEngine(model, max_batch_size=1, max_len=64)
    base = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0]
    model.cfg.eos_token_id = base.token_ids[2]
    engine = RolloutEngine(model, max_batch_size=1, max_len=64)
    c = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0))[0]
    assert c.finish_reason == "stop" and c.token_ids == base.token_ids[: base.token_ids.index(c.stop_reason) + 1]


def test_a_checkpoints_generation_config_eos_also_stops(tmp_path):
    """transformers' generate stops at generation_config.json's eos_token_id (a chat model's end-of-turn token is
    often listed only there): a loaded checkpoint's engine stops there too, besides config.json's EOS."""
    import json

    from dsalign.model import load_checkpoint, save_checkpoint

    model = tiny_model()
    prompt = _prompts(model.cfg.vocab_size)[0]
    base = RolloutEngine(model, max_batch_size=1, max_len=64).generate(
        [prompt], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0]  # fmt: skip
    turn_end = next(t for t in base.token_ids[2:] if t != model.cfg.eos_token_id)
    save_checkpoint(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"eos_token_id": [model.cfg.eos_token_id,
                                                                                            turn_end]}))  # fmt: skip
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.generation_eos_token_ids == {model.cfg.eos_token_id, turn_end}
    c = RolloutEngine(loaded, max_batch_size=1, max_len=64).generate(
        [prompt], SamplingParams(max_new_tokens=8, temperature=0))[0]  # fmt: skip
    assert (c.finish_reason, c.stop_reason) == ("stop", turn_end)
    assert c.token_ids == base.token_ids[: base.token_ids.index(turn_end) + 1]
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be an integer or a list"):
        load_checkpoint(tmp_path / "ckpt")


def test_context_limit_ends_with_length():
    model = tiny_model()
    engine = RolloutEngine(model, max_batch_size=2, max_len=10, speculative=True)
    out = engine.generate([[5] * 7, [6] * 3], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True))
    assert [len(c.prompt_ids) + len(c.token_ids) for c in out] == [10, 10]
    assert all(c.finish_reason == "length" for c in out)


def test_fp8_latent_cache_layout_and_accuracy():
    big = ModelConfig.preset("v3-671b")
    meta = FP8LatentCache(big, batch_size=1, max_len=1, device="meta")
    assert meta.bytes_per_token() == 61 * 656  # FlashMLA's FP8 layout: 512 e4m3 + 4 fp32 scales + 64 bf16
    model = tiny_model(kv_lora_rank=128)
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        full = model(x).logits
        for kind, tol in ((LatentCache, 1e-4), (FP8LatentCache, 0.05)):
            cache = kind(model.cfg, 2, 16)
            steps = [model(x[:, :8], cache=cache).logits]
            steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(8, 16)]
            err = (torch.cat(steps, dim=1) - full).abs().max().item()
            assert err <= tol * full.abs().max().item(), (kind.__name__, err)
    engine = RolloutEngine(model, max_batch_size=2, max_len=32, cache_dtype="fp8", speculative=True)
    assert engine.cache_bytes_per_token() == 3 * (128 + 4 + 8 * 2)
    out = engine.generate(_prompts(model.cfg.vocab_size)[:3], SamplingParams(max_new_tokens=5, temperature=0))
    assert all(len(c.token_ids) >= 1 for c in out)


def test_update_weights_in_place():
    a, b = tiny_model(seed=0), tiny_model(seed=7)
    prompts = _prompts(a.cfg.vocab_size)
    sp = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    engine = RolloutEngine(a, max_batch_size=3, max_len=64, speculative=True)
    before = [c.token_ids for c in engine.generate(prompts, sp)]
    assert engine.update_weights(b.state_dict()) == len(b.state_dict())
    after = [c.token_ids for c in engine.generate(prompts, sp)]
    want = [c.token_ids for c in RolloutEngine(b, max_batch_size=3, max_len=64).generate(prompts, sp)]
    assert after == want and after != before
    with pytest.raises(KeyError, match="does not have"):
        engine.update_weights({"layers.0.nonsense": torch.zeros(1)})
    with pytest.raises(KeyError, match="lacks"):
        engine.update_weights({"norm.weight": b.norm.weight})


def test_update_weights_refreshes_fp8_weight_caches():
    """With FP8 projections the engine runs on cached quantized weights; an update must requantize them."""
    a, b = tiny_model(seed=0, fp8=True), tiny_model(seed=7, fp8=True)
    prompts = _prompts(a.cfg.vocab_size)[:3]
    sp = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    engine = RolloutEngine(a, max_batch_size=3, max_len=64)
    before = [c.token_ids for c in engine.generate(prompts, sp)]
    engine.update_weights(b.state_dict())
    after = [c.token_ids for c in engine.generate(prompts, sp)]
    want = [c.token_ids for c in RolloutEngine(b, max_batch_size=3, max_len=64).generate(prompts, sp)]
    assert after == want and after != before


def test_generate_runs_in_eval_mode_and_restores_train_mode():
    """A colocated GRPO trainer shares the model: generation must not depend on, nor change, its mode."""
    model = tiny_model()
    prompts = _prompts(model.cfg.vocab_size)[:2]
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    engine = RolloutEngine(model, max_batch_size=2, max_len=32)
    want = [c.token_ids for c in engine.generate(prompts, sp)]
    model.train()
    modes = []
    out = engine.generate(prompts, sp, on_token=lambda r, j, ids: modes.append(model.training))
    assert [c.token_ids for c in out] == want
    assert modes and not any(modes)  # eval while generating
    assert model.training  # restored afterwards


def test_cache_is_sized_to_what_the_call_can_reach():
    """max_len defaults to the model's context (163,840 at 671B); the cache must not be allocated that long."""
    model = tiny_model()
    engine = RolloutEngine(model, max_batch_size=2, speculative=True)
    assert engine.max_len == model.cfg.max_position_embeddings and engine.cache is None
    engine.generate([[3, 4, 5], [6] * 9], SamplingParams(max_new_tokens=5, temperature=0))
    assert engine.cache.max_len == 9 + 5 + 1
    assert engine.cache.num_layers == model.cfg.num_hidden_layers + 1  # the MTP block's latent too
    engine.generate([[3]], SamplingParams(max_new_tokens=2, temperature=0))
    assert engine.cache.max_len == 15  # kept, not shrunk


def test_large_seeds_sample_and_reproduce():
    """The pipelines derive request seeds as (run seed * 100_003 + iteration) * 1_000_003 + prompt; from a run seed
    of 185 on, seed * 1_000_003 once more passed 2**64 and torch.Generator refused it."""
    model = tiny_model()
    prompt = _prompts(model.cfg.vocab_size)[1]
    engine = RolloutEngine(model, max_batch_size=2, max_len=64)
    for seed in ((185 * 100_003 + 0) * 1_000_003 + 3, 2**45, 2**70):
        sp = SamplingParams(max_new_tokens=4, temperature=1.0, n=2, seed=seed, ignore_eos=True)
        first, again = engine.generate([prompt], sp), engine.generate([prompt], sp)
        assert [c.token_ids for c in first] == [c.token_ids for c in again]
        assert 0 <= sp.sample_seed(1) < 2**63


def test_prefill_only_what_free_slots_need_and_keep_only_last_positions():
    """A prompt is prefilled when its samples are needed (not on every admission), and a stashed prompt keeps
    [V] logits and [D] hidden, not its prefill batch's [B, P, V] logits."""
    model = tiny_model(seed=1)
    prompts = _prompts(model.cfg.vocab_size, lens=(8,) * 12)
    params = [SamplingParams(max_new_tokens=3 + i % 5, n=3, temperature=1.0, seed=i, ignore_eos=True)
              for i in range(12)]  # fmt: skip
    engine = RolloutEngine(model, max_batch_size=4, max_len=64)
    peak, pinned = [0], [0]
    admit = engine._admit

    def watched(free, slots, waiting, stash, ids, params, done):
        admit(free, slots, waiting, stash, ids, params, done)
        peak[0] = max(peak[0], len(stash))
        for pre in stash.values():
            for t in (pre.logits_V, pre.hidden_D):
                pinned[0] = max(pinned[0], t.untyped_storage().nbytes())

    engine._admit = watched
    out = engine.generate(prompts, params)
    assert len(out) == 36
    assert peak[0] <= 2  # 4 slots never wait on samples of more than 2 prompts of 3 samples each
    assert pinned[0] <= 2 * model.cfg.vocab_size * 4  # one prefill batch's [B <= 2, V] logits at most


def test_empty_request_list_and_non_integer_ids():
    engine = RolloutEngine(tiny_model(), max_batch_size=2, max_len=16)
    assert engine.generate([]) == []
    with pytest.raises(TypeError, match=r"prompt 0: token ids must be integers, got 3\.9 \(float\)"):
        engine.generate([[3.9, 4]])
    with pytest.raises(TypeError, match=r"token ids must be integers, got True \(bool\)"):
        engine.generate([[True, 4]])
    with pytest.raises(TypeError, match=r"token ids must be integers, got a torch.float32 tensor"):
        engine.generate([torch.tensor([3.0, 4.0])])


def test_decode_steps_run_only_live_rows_and_outputs_do_not_move():
    """As sequences finish, the live ones move to the lowest slots (cache rows with them) and a step runs only
    those rows; each completion equals the same seeded request generated alone."""
    model = tiny_model()
    prompts = _prompts(model.cfg.vocab_size)
    params = [SamplingParams(max_new_tokens=m, temperature=1.0, seed=7 + i, ignore_eos=True)
              for i, m in enumerate((2, 9, 4, 12, 6))]  # fmt: skip
    engine = RolloutEngine(model, max_batch_size=5, max_len=64)
    rows = []
    forward = model.forward

    def recording(x, *args, **kwargs):
        if kwargs.get("cache") is not None and kwargs["cache"].lengths.any():
            rows.append(x.shape[0])
        return forward(x, *args, **kwargs)

    model.forward = recording
    try:
        out = engine.generate(prompts, params)
    finally:
        del model.forward
    assert rows == sorted(rows, reverse=True) and rows[0] == 5 and rows[-1] == 1  # the step shrinks as rows finish
    assert len(rows) == 11  # the longest request's 11 decode steps (its first token comes from the prefill)
    for c, p, prompt in zip(out, params, prompts):
        alone = RolloutEngine(model, max_batch_size=1, max_len=64).generate([prompt], p)[0]
        assert c.token_ids == alone.token_ids and len(c.token_ids) == p.max_new_tokens
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(alone.logprobs), rtol=0, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("speculative", [False, True])
def test_expert_parallel_ranks_generate_unequal_work_in_step(launch_workers, speculative):
    """Colocated GRPO with ep_size > 1: every rank decodes its own prompts through the expert-sharded model, whose
    MoE layers all-to-all with the other ranks. Ranks with different completion lengths (and, under dynamic
    sampling, different numbers of generate calls) must neither hang nor change their results: each rank's
    completions equal the unsharded model's (tokens exactly, log-probs within 1e-4)."""
    import pathlib

    script = str(pathlib.Path(__file__).with_name("_ep_worker.py"))
    outputs = launch_workers(script, 2, ["1" if speculative else "0"], timeout=240)
    assert all("ok" in out for out in outputs), outputs
    dummies = [int(out.rsplit("dummy forwards", 1)[1]) for out in outputs]
    assert dummies[1] > 0  # rank 1 (less work) kept serving rank 0's forwards


def test_fp8_logprobs_match_training_forward_with_lora_on_kv_b():
    """LoRA on an FP8 kv_b_proj: the absorbed decode applies (fp8 weight + adapter delta) to the quantized cached
    latent, so the training forward feeds its adapters that latent too (they saw the raw one: 0.2 apart)."""
    from dsalign.alignment.trainer.lora import LoraSettings, apply_lora

    model = tiny_model(seed=1, fp8=True)
    apply_lora(model, LoraSettings(r=4, alpha=8.0, target_modules=("kv_b_proj",)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=g)  # adapters that have trained
        model.lm_head.weight.mul_(10)
    model.eval()
    prompts = _prompts(model.cfg.vocab_size, seed=1)
    sp = SamplingParams(max_new_tokens=8, temperature=0.7, seed=5, ignore_eos=True)
    worst = 0.0
    with torch.no_grad():
        for c in RolloutEngine(model, max_batch_size=4, max_len=64).generate(prompts, sp):
            logits = model(torch.tensor([c.prompt_ids + c.token_ids])).logits[0].float() / 0.7
            P, L = len(c.prompt_ids), len(c.token_ids)
            want = torch.log_softmax(logits[P - 1 : P + L - 1], dim=-1).gather(1, torch.tensor(c.token_ids)[:, None])
            worst = max(worst, (want[:, 0] - torch.tensor(c.logprobs)).abs().max().item())
    assert worst <= 1e-5, worst


@pytest.mark.distributed
def test_expert_parallel_rank_refusing_its_requests_stops_the_others(launch_workers):
    """A rank whose requests fail validation tells the EP group (instead of leaving the others waiting for its
    forwards until the process group's timeout): every rank raises promptly."""
    import pathlib

    script = str(pathlib.Path(__file__).with_name("_ep_worker.py"))
    rank0, rank1 = launch_workers(script, 2, ["refuse"], timeout=120)
    assert "rank 1: raised ValueError" in rank1 and "does not fit the context" in rank1
    assert "rank 0: raised RuntimeError: generate: another rank of the expert-parallel group failed" in rank0


@pytest.mark.distributed
def test_expert_parallel_rank_failing_between_generate_calls_stops_the_others(launch_workers):
    """A rank that raises inside an ``ep_phase`` outside any forward (its scorer failed) aborts the group's
    agreement: the rank still decoding raises at once instead of waiting for it until the group's timeout."""
    import pathlib

    script = str(pathlib.Path(__file__).with_name("_ep_worker.py"))
    rank0, rank1 = launch_workers(script, 2, ["scorer"], timeout=120)
    assert "rank 1: raised RuntimeError: scorer failed" in rank1
    assert "rank 0: raised RuntimeError: generate: another rank of the expert-parallel group failed" in rank0


def test_dense_weights_are_cast_once_per_generate_under_autocast(monkeypatch):
    """Each decode step under the trainer's bf16 autocast cast every projection's fp32 weight again (autocast casts
    per call): generation ran 1.85x slower in bf16 than fp32 on the bench (docs/PERFORMANCE.md). The projections now
    reuse one copy per generate, with the same tokens and log-probs bit for bit."""
    from dsalign.kernels.grouped_gemm import _CAST_CACHE
    from dsalign.model import layers

    model = tiny_model()
    engine = RolloutEngine(model, max_batch_size=2, max_len=64)
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    prompts = _prompts(model.cfg.vocab_size)[:2]
    cached = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = engine.generate(prompts, sp, on_token=lambda *a: cached.append(len(_CAST_CACHE)))
        monkeypatch.setattr(layers, "caching_casts", lambda: False)
        plain = engine.generate(prompts, sp)
    experts = sum(1 for name, _ in model.named_parameters() if "experts." in name)
    assert max(cached) > experts  # the dense projections' copies too, not only the expert stacks'
    assert [c.token_ids for c in fast] == [c.token_ids for c in plain]
    assert [c.logprobs for c in fast] == [c.logprobs for c in plain]


def test_under_autocast_the_latent_cache_is_kept_in_its_dtype():
    """Attention under the trainer's bf16 autocast cast the fp32 latents to bf16 on every decode step (the whole
    context, every layer): the cache now holds them in bf16, half the memory per token, with the same tokens and
    log-probs bit for bit; an explicit cache_dtype still wins, and a later call without autocast gets fp32 again."""
    model = tiny_model()
    prompts = _prompts(model.cfg.vocab_size)[:3]
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    engine = RolloutEngine(model, max_batch_size=3, max_len=64)
    fp32 = RolloutEngine(model, max_batch_size=3, max_len=64, cache_dtype=torch.float32)
    from dsalign.model.mla import MLA

    seen = set()
    attend = MLA._attend_absorbed

    def spy(self, q_nope, q_pe, c_kv, *rest):
        seen.add(c_kv.dtype)  # what attention reads the context in: never upcast from the bf16 cache
        return attend(self, q_nope, q_pe, c_kv, *rest)

    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as mp:
        mp.setattr(MLA, "_attend_absorbed", spy)
        half, full = engine.generate(prompts, sp), fp32.generate(prompts, sp)
        assert engine.cache.latent_dtype == torch.bfloat16 and fp32.cache.latent_dtype == torch.float32
        assert seen == {torch.bfloat16}
        assert engine.cache_bytes_per_token() * 2 == fp32.cache_bytes_per_token()
    assert [(c.token_ids, c.logprobs) for c in half] == [(c.token_ids, c.logprobs) for c in full]
    engine.generate(prompts, sp)
    assert engine.cache.latent_dtype == torch.float32


def test_experts_autocast_copies_live_only_inside_generate():
    """Under the trainer's bf16 autocast the engine's decode steps reuse one bf16 copy per expert stack; the copies
    are dropped when generate returns, and no-grad forwards outside it (a teacher's scores, the rollout correction)
    keep none, so none sits through a training step's peak memory."""
    from dsalign.kernels.grouped_gemm import _CAST_CACHE

    model = tiny_model()
    engine = RolloutEngine(model, max_batch_size=2, max_len=64)
    seen = []
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine.generate(_prompts(model.cfg.vocab_size)[:2], sp, on_token=lambda *a: seen.append(len(_CAST_CACHE)))
        assert min(seen) > 0 and len(_CAST_CACHE) == 0
        with torch.no_grad():
            model(torch.tensor([_prompts(model.cfg.vocab_size)[0]]))
        assert len(_CAST_CACHE) == 0
