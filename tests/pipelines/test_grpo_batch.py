"""The GRPO stage's batch: unscorable completions (reward None) as TRL's GRPOTrainer treats them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from dsalign.alignment.advantages import compute_advantages
from dsalign.pipelines.config import GRPOParams
from dsalign.pipelines.stages import grpo_metrics, make_rl_batch


def _comps(n: int):
    return [SimpleNamespace(token_ids=[5, 6, 7][: 1 + i % 3], logprobs=[-0.5] * (1 + i % 3), finish_reason="stop",
                            drafted=0, accepted=0) for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("advantage", ["grpo", "drgrpo", "rloo"])
def test_unscorable_completions_get_zero_advantage_and_stay_out_of_the_baseline(advantage):
    tok = SimpleNamespace(pad_token_id=0)
    params = GRPOParams(group_size=4, advantage=advantage)
    rewards = [1.0, None, 0.0, 1.0, 0.5, 0.25, None, None]  # two groups of 4
    batch = make_rl_batch(tok, [[1, 2], [3]], _comps(8), rewards, 4, params)
    adv = batch["advantages"]
    assert adv[1] == 0 and adv[6] == 0 and adv[7] == 0
    first = compute_advantages(advantage, torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(adv[[0, 2, 3]], first, rtol=0, atol=0)  # the group of the 3 scored samples
    second = compute_advantages(advantage, torch.tensor([0.5, 0.25]), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(adv[[4, 5]], second, rtol=0, atol=0)
    as_zero = compute_advantages(advantage, torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long))
    assert as_zero[1] < 0  # what counting None as 0 did: a spurious negative advantage
    full = [1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 0.0, 1.0]
    torch.testing.assert_close(make_rl_batch(tok, [[1, 2], [3]], _comps(8), full, 4, params)["advantages"],
                               compute_advantages(advantage, torch.tensor(full), torch.arange(2).repeat_interleave(4)),
                               rtol=0, atol=0)  # fmt: skip


def test_grpo_metrics_average_what_was_scored_and_count_failures():
    scored = SimpleNamespace(rewards=[1.0, None, 0.0, None], components={"math_accuracy": [1.0, None, 0.0, None]},
                             metrics={"errors/total": 2.0})  # fmt: skip
    m = grpo_metrics({}, _comps(4), scored, gen_s=2.0)
    assert m["reward"] == 0.5 and m["accuracy"] == 0.5 and m["unscorable_frac"] == 0.5 and m["reward_errors"] == 2.0
    none = SimpleNamespace(rewards=[None], components={"x": [None]}, metrics={})
    assert math.isnan(grpo_metrics({}, _comps(1), none, gen_s=1.0)["reward"])
    assert "rollout_mtp_acceptance" not in m  # plain decoding drafts nothing
    spec = _comps(2)
    spec[0].drafted, spec[0].accepted, spec[1].drafted, spec[1].accepted = 3, 2, 1, 0
    assert grpo_metrics({}, spec, None, gen_s=1.0)["rollout_mtp_acceptance"] == 2 / 4


@pytest.mark.distributed
def test_grpo_metrics_pool_every_ranks_samples(launch_workers):
    """With several trainer ranks each holds a share of the samples: the logged length, rewards and counts are
    over all of them (rank 0 alone logged only its own share), identical on every rank."""
    import json
    import pathlib

    script = str(pathlib.Path(__file__).with_name("_metrics_worker.py"))
    outs = [json.loads(out.split("METRICS ", 1)[1].splitlines()[0]) for out in launch_workers(script, 2, [], 120)]
    assert outs[0] == outs[1]
    m = outs[0]
    assert m["response_length"] == 16 / 4 and m["generate_s"] == 4.0 and m["tokens_per_s"] == 16 / 4.0
    assert m["reward"] == 1.5 / 3 and m["accuracy"] == 2.0 / 3 and m["unscorable_frac"] == 1 / 4
    assert m["reward_errors"] == 3.0 and m["truncated_frac"] == 1 / 4
    assert m["dynamic_sampling/rounds"] == 3 and m["dynamic_sampling/groups_dropped"] == 4
    assert m["rollout_mtp_acceptance"] == 7 / 16


class _FakeGenerator:
    """Completions whose token is the prompt's row value; records which positions were generated."""

    def __init__(self):
        self.calls = []

    def generate(self, rows, positions, n, temperature, max_new_tokens, seed, top_p):
        self.calls.append(list(positions))
        comps = [SimpleNamespace(token_ids=[r["v"], j], logprobs=[-1.0, -1.0], finish_reason="stop")
                 for r in rows for j in range(n)]  # fmt: skip
        return [[r["v"]] for r in rows], comps


def _scorer(prompts, completions, completion_ids, easy, **columns):
    from dsalign.rewards import CombinedRewards

    rewards = [1.0 if e else float(ids[1] % 2) for ids, e in zip(completion_ids, easy)]  # easy: constant groups
    return CombinedRewards(rewards, {"r": rewards}, [], {"errors/total": 0.0})


def test_dynamic_sampling_drops_constant_groups_and_refills():
    import random

    from dsalign.pipelines.stages import grpo_iteration_order, sample_iteration

    rows = [{"v": i, "prompt": f"p{i}", "easy": i % 3 == 0} for i in range(30)]
    tok = SimpleNamespace(decode=lambda ids, **kw: "", eos_token_id=None)
    plain_p = GRPOParams(prompts_per_iter=6, group_size=4)
    order = grpo_iteration_order(30, 6, seed=1, it=2)
    # the iteration's batch first, drawn exactly as the GRPO stage always drew it (runs stay reproducible)
    assert sorted(order) == list(range(30)) and order[:6] == random.Random(1 * 7_919 + 2).sample(range(30), 6)
    gen = _FakeGenerator()
    ids, comps, scored, _, extra = sample_iteration(gen, _scorer, tok, rows, plain_p, seed=1, it=2)
    assert gen.calls == [list(range(6))] and extra == {} and len(comps) == 24
    easy_first = sum(rows[order[i]]["easy"] for i in range(6))

    dyn = GRPOParams(prompts_per_iter=6, group_size=4, dynamic_sampling=True, dynamic_sampling_max_rounds=8)
    gen = _FakeGenerator()
    ids, comps, scored, _, extra = sample_iteration(gen, _scorer, tok, rows, dyn, seed=1, it=2)
    assert gen.calls[0] == list(range(6)) and len(ids) == 6 and len(comps) == 24 == len(scored.rewards)
    assert not any(rows[i[0]]["easy"] for i in ids)  # every kept group has varying rewards
    assert extra["dynamic_sampling/groups_dropped"] >= easy_first and extra["dynamic_sampling/rounds"] == len(gen.calls)
    assert [c.token_ids[0] for c in comps[::4]] == [i[0] for i in ids] and scored.components["r"] == scored.rewards

    # nothing informative: after max_rounds the dropped groups fill the batch (zero advantage), the stage goes on
    hard = [{**r, "easy": r["v"] != order[7]} for r in rows]  # one informative prompt, in the second round
    two = GRPOParams(prompts_per_iter=6, group_size=4, dynamic_sampling=True, dynamic_sampling_max_rounds=2)
    gen = _FakeGenerator()
    ids, comps, scored, _, extra = sample_iteration(gen, _scorer, tok, hard, two, seed=1, it=2)
    assert gen.calls == [list(range(6)), list(range(6, 12))] and extra["dynamic_sampling/shortfall"] == 5
    assert [i[0] for i in ids] == [order[7]] + [order[i] for i in range(5)] and len(comps) == 24


def test_colocated_rollout_decodes_under_the_trainers_autocast(monkeypatch):
    """training.compute_dtype bf16: the rollout runs under the update's autocast, so the behaviour log-probs come
    from the precision the update recomputes them in (fp32 stays plain)."""
    import dsalign.pipelines.stages as stages
    from dsalign.alignment.trainer import TrainerConfig
    from dsalign.alignment.trainer.step import autocast_context

    seen = []
    monkeypatch.setattr(stages, "rollout", lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or ([], []))
    for dtype in ("bf16", "fp32"):
        cfg = TrainerConfig(compute_dtype=dtype)
        local = stages.LocalRollout(None, None, autocast=lambda c=cfg: autocast_context(c, torch.device("cpu")))
        local.generate([], [], 1, 1.0, 4, seed=0)
    stages.LocalRollout(None, None).generate([], [], 1, 1.0, 4, seed=0)
    assert seen == [True, False, False]


def test_rewards_see_each_samples_finish_reason():
    """``sample_iteration`` hands the scorer every sample's ``finish_reason``: ``stop_properly`` penalizes exactly the
    completions cut at the token limit."""
    from dsalign.pipelines.config import RewardEntry
    from dsalign.pipelines.stages import build_combiner, sample_iteration

    class Generator:
        def generate(self, rows, row_ids, n, temperature, max_new_tokens, seed, top_p=1.0):
            comps = [SimpleNamespace(token_ids=[5, 6], logprobs=[-0.1, -0.2],
                                     finish_reason="length" if (r + j) % 3 == 0 else "stop")
                     for r in row_ids for j in range(n)]  # fmt: skip
            return [[1, 2] for _ in rows], comps

    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: "x", eos_token_id=0)
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "prompt_id": i} for i in range(4)]
    params = GRPOParams(prompts_per_iter=4, group_size=3)
    scorer = build_combiner([RewardEntry(fn="stop_properly", params={"penalty": 0.5})])
    _, comps, scored, _, _ = sample_iteration(Generator(), scorer, tok, rows, params, seed=0, it=0)
    assert scored.rewards == [-0.5 if c.finish_reason == "length" else 0.0 for c in comps]
    assert -0.5 in scored.rewards and 0.0 in scored.rewards


def test_dr_grpo_normaliser_is_the_completion_budget():
    """``seq-mean-token-sum-norm`` divides by B x the completion budget (``max_new_tokens``), a constant: identical
    completion tokens weigh the same whatever their prompt's length or micro-batch (the padded row length, the
    fallback, varied with both)."""
    from dsalign.alignment.policy_loss import aggregate_loss
    from dsalign.pipelines.stages import grpo_loss_config, split_micro

    tok = SimpleNamespace(pad_token_id=0)
    params = GRPOParams(group_size=2, loss_agg="seq-mean-token-sum-norm", max_new_tokens=16, micro_batch_size=2)
    comps = [SimpleNamespace(token_ids=[5, 6, 7, 8], logprobs=[-0.5] * 4, finish_reason="stop") for _ in range(4)]
    batch = make_rl_batch(tok, [list(range(1, 21)), [1, 2, 3]], comps, [1.0, 0.0, 1.0, 0.0], 2, params)
    cfg = grpo_loss_config(params)
    weights = []
    for mb in split_micro(batch, params.micro_batch_size):
        per_token = torch.ones(mb["completion_mask"].shape, requires_grad=True)
        aggregate_loss(per_token, mb["completion_mask"], cfg.agg, cfg.norm_length).backward()
        weights.append(per_token.grad[mb["completion_mask"] > 0].unique().tolist())
    assert weights == [[1 / (2 * 16)], [1 / (2 * 16)]]


def test_interleave_shares_restores_the_prompts_order():
    """Trace distillation with several ranks: rank r samples prompts r, r + world, ...; the gathered traces go back
    into the prompts' order (they used to be concatenated rank by rank, so the SFT data depended on num_workers)."""
    from dsalign.pipelines.stages import interleave_shares

    k, world, prompts = 2, 3, list(range(7))  # uneven shares: 3, 2, 2 prompts
    shares = [[(g, t) for g in prompts[r::world] for t in range(k)] for r in range(world)]
    assert interleave_shares(shares, k) == [(g, t) for g in prompts for t in range(k)]
    assert interleave_shares([[(0, 0)], []], 1) == [(0, 0)]


def test_local_rollout_phase_runs_under_the_trainers_autocast():
    """The drain at the end of an EP phase runs dummy forwards that must exchange the same dtypes as the other
    ranks' real forwards, which run under the trainer's autocast (bf16 experts): the phase is entered under it too
    (outside it, a bf16 rank met an fp32 rank in the combine all-to-all: gloo aborted on the size mismatch)."""
    import contextlib

    from dsalign.pipelines.stages import LocalRollout

    seen = []

    class Engine:
        @contextlib.contextmanager
        def ep_phase(self):
            yield
            seen.append(torch.is_autocast_enabled("cpu"))  # where the drain runs

    rollout = LocalRollout(Engine(), tokenizer=None, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    with rollout.ep_phase():
        pass
    assert seen == [True]


def test_shared_prompts_setting_reaches_the_batch():
    tok = SimpleNamespace(pad_token_id=0)
    rewards = [1.0, 0.0, 0.5, 0.25]
    on = make_rl_batch(tok, [[1, 2], [3]], _comps(4), rewards, 2, GRPOParams(group_size=2))
    assert on["prompt_group"].tolist() == [0, 0, 1, 1] and on["prompt_len"].tolist() == [2, 2, 1, 1]
    off = make_rl_batch(tok, [[1, 2], [3]], _comps(4), rewards, 2, GRPOParams(group_size=2, shared_prompts=False))
    assert "prompt_group" not in off and "prompt_len" not in off


def test_rewards_get_trls_two_formats(tmp_path):
    """A string prompt in the file reaches a reward as that string with a plain-text completion (TRL's "standard"
    format); a chat prompt as its messages with ``[{"role": "assistant", "content": ...}]`` (TRL's
    "conversational" format), so TRL's own rewards, which index ``completion[0]["content"]`` on chat data, score it.
    The loader's format flag is not a column rewards see."""
    import json

    from dsalign.pipelines.stages import score_samples, stage_file_rows
    from dsalign.rewards import RewardCombiner, RewardSpec
    from trl.rewards import think_format_reward

    text, chat = tmp_path / "text.jsonl", tmp_path / "chat.jsonl"
    text.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n")
    msgs = [{"role": "system", "content": "Think first."}, {"role": "user", "content": "What is 2+2?"}]
    chat.write_text(json.dumps({"prompt": msgs, "answer": "4"}) + "\n")
    seen = []

    def spy(prompts, completions, completion_ids=None, **columns):
        seen.append((prompts, completions, sorted(columns)))
        return [1.0] * len(prompts)

    reply = "<think>\nadd\n</think>\n4"
    for path, specs in [(text, [RewardSpec(spy)]),  # TRL's think_format_reward reads conversational data only
                        (chat, [RewardSpec(spy), RewardSpec(think_format_reward, name="trl_format")])]:
        rows, _ = stage_file_rows(SimpleNamespace(path=str(path), num_rows=None, length_target=None, split="train",
                                                  skip_invalid=False), "prompt")
        scored = score_samples(RewardCombiner(specs), rows, 2, [reply, "4"], _comps(2))
        assert not scored.failures
    assert scored.components["trl_format"] == [1.0, 0.0]
    (p_text, c_text, cols), (p_chat, c_chat, _) = seen
    assert p_text == ["What is 2+2?"] * 2 and c_text == [reply, "4"]
    assert p_chat == [msgs] * 2 and c_chat == [[{"role": "assistant", "content": reply}], [{"role": "assistant",
                                                                                            "content": "4"}]]
    assert cols == ["answer", "finish_reason", "prompt_id"]
    mixed = tmp_path / "mixed.jsonl"  # one format per call, as TRL: conversational when any prompt is chat
    mixed.write_text(text.read_text() + chat.read_text())
    rows, _ = stage_file_rows(SimpleNamespace(path=str(mixed), num_rows=None, length_target=None, split="train",
                                              skip_invalid=False), "prompt")  # fmt: skip
    scored = score_samples(RewardCombiner([RewardSpec(spy), RewardSpec(think_format_reward, name="f")]), rows, 1,
                           [reply, reply], _comps(2))  # fmt: skip
    assert scored.components["f"] == [1.0, 1.0] and not scored.failures
    assert seen[-1][0] == [[{"role": "user", "content": "What is 2+2?"}], msgs]
