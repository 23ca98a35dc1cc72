"""R1-style trace filtering with provenance, top-k logit distillation, and length/style targets."""

import math

import datasets
import pytest
import torch
from dsalign.alignment.chat import tokenize_conversation
from dsalign.alignment.data import load_conversations
from dsalign.alignment.distill import (
    TraceFilterConfig,
    filter_traces,
    score_traces,
    split_reasoning,
    topk_distill_loss,
    write_sft_dataset,
)
from dsalign.alignment.length_control import LengthControlConfig, add_length_targets, sample_target

WF = "<think>\nadd them\n</think>\n\nThe answer is {}."


def _trace(pid, reward, completion, num_tokens=50, prompt="What is 2 + 2?"):
    return {
        "prompt_id": pid,
        "prompt": prompt,
        "completion": completion,
        "reward": reward,
        "num_tokens": num_tokens,
        "teacher": "teacher-r1",
    }


TRACES = [
    _trace("p1", 1.0, WF.format(4), 50),
    _trace("p1", 1.0, WF.format("four"), 30),  # same reward, shorter: best of p1
    _trace("p1", 0.0, WF.format(5)),  # incorrect
    _trace("p2", 1.0, "The answer is 6 without thinking."),  # malformed
    _trace("p2", 1.0, WF.format(6), 200),  # too long
    _trace("p2", None, WF.format(6)),  # reward not applicable -> not correct
    _trace("p3", 1.5, "<think>\nonly thoughts\n</think>\n"),  # malformed: empty answer
    _trace("p3", 2.0, WF.format(7), 40),  # best of p3
    _trace("p3", 1.0, "forced think prompt\n</think>\n\n7", 20),  # well formed: opening tag was in the prompt
]


def test_filter_keeps_best_of_k_with_provenance():
    rows, stats = filter_traces(TRACES, TraceFilterConfig(min_reward=1.0, max_tokens=100, keep="best"))
    assert [(r["prompt_id"], r["trace_index"], r["reward"]) for r in rows] == [("p1", 1, 1.0), ("p3", 1, 2.0)]
    assert all(r["teacher"] == "teacher-r1" for r in rows)
    assert rows[0]["messages"] == [
        {"role": "user", "content": "What is 2 + 2?", "reasoning_content": None},
        {"role": "assistant", "content": "The answer is four.", "reasoning_content": "add them"},
    ]
    assert (stats.traces, stats.kept, stats.incorrect, stats.too_long, stats.malformed) == (9, 2, 2, 1, 2)
    assert (stats.prompts, stats.prompts_kept) == (3, 2)


def test_filter_keeps_all_passing_and_pass_rate_window():
    rows, _ = filter_traces(TRACES, TraceFilterConfig(max_tokens=100, keep="all"))
    assert [(r["prompt_id"], r["trace_index"]) for r in rows] == [("p1", 0), ("p1", 1), ("p3", 1), ("p3", 2)]
    assert rows[3]["messages"][-1] == {"role": "assistant", "content": "7", "reasoning_content": "forced think prompt"}
    # p3's teacher is always correct (3/3): drop prompts that are too easy
    rows, stats = filter_traces(TRACES, TraceFilterConfig(max_tokens=100, keep="all", max_pass_rate=0.9))
    assert [r["prompt_id"] for r in rows] == ["p1", "p1"] and stats.prompts_out_of_pass_rate == 1
    assert rows[0]["pass_rate"] == pytest.approx(2 / 3)


def test_split_reasoning():
    assert split_reasoning(WF.format(4)) == ("add them", "The answer is 4.")
    assert split_reasoning("<think>a</think>b</think>c") is None
    assert split_reasoning("junk <think>a</think> b") is None
    assert split_reasoning("<think></think> b") is None


def test_score_traces_weights_and_not_applicable():
    traces = [
        {"prompt": "q", "completion": "The answer is 4.", "answer": "4", "kind": "math"},
        {"prompt": "q", "completion": "The answer is 5.", "answer": "4", "kind": "math"},
        {"prompt": "q", "completion": "code", "answer": None, "kind": "code"},
    ]

    def correct(prompts, completions, answer, kind, **_):
        return [None if k != "math" else float(a in c) for c, a, k in zip(completions, answer, kind)]

    def brevity(prompts, completions, completion_ids=None, **_):
        return [1.0 if len(c) < 10 else None for c in completions]

    assert score_traces(traces, [correct, brevity], [2.0, 0.5]) == [2.0, 0.0, 0.5]
    assert score_traces(traces[:2], [brevity]) == [None, None]


def test_written_dataset_loads_and_tokenizes(tmp_path, tokenizer):
    rows, _ = filter_traces(TRACES, TraceFilterConfig(max_tokens=100))
    path = write_sft_dataset(rows, tmp_path / "sft" / "distilled.jsonl")
    ds, report = load_conversations(str(path))
    assert report.num_invalid == 0 and ds["prompt_id"] == ["p1", "p3"] and ds["teacher"] == ["teacher-r1"] * 2
    conv = tokenize_conversation(tokenizer, ds[0]["messages"])
    masked = tokenizer.decode([t for t, m in zip(conv.input_ids, conv.assistant_mask) if m])
    assert masked == "<think>\nadd them\n</think>\n\nThe answer is four.<｜end▁of▁sentence｜>"


def test_topk_distill_hand_computed():
    student = torch.zeros(1, 1, 3)  # uniform 1/3
    ids = torch.tensor([[[0, 1]]])
    teacher = torch.tensor([[[math.log(0.5), math.log(0.25)]]])  # renormalised on top-2: (2/3, 1/3)
    mask = torch.ones(1, 1)
    fwd, _ = topk_distill_loss(student, ids, teacher, mask, "forward")
    assert fwd.item() == pytest.approx(2 / 3 * math.log(2))  # 2/3 ln(2/3 / 1/3) + 1/3 ln(1)
    rev, _ = topk_distill_loss(student, ids, teacher, mask, "reverse")
    assert rev.item() == pytest.approx(0.5 * math.log(0.75) + 0.5 * math.log(1.5))  # q~ = (1/2, 1/2)
    with pytest.raises(ValueError, match="vocabularies differ"):
        topk_distill_loss(student, torch.tensor([[[0, 3]]]), teacher, mask)


def test_topk_distill_forward_gradient_is_softmax_minus_teacher():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 5, generator=gen, requires_grad=True)
    teacher_logp = torch.log_softmax(torch.randn(2, 3, 5, generator=gen), -1)
    ids = torch.arange(5).expand(2, 3, 5)  # k = V: exact forward KL
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, _ = topk_distill_loss(student, ids, teacher_logp, mask, "forward")
    loss.backward()
    want = (torch.softmax(student.detach(), -1) - teacher_logp.exp()) * mask[..., None] / 3
    torch.testing.assert_close(student.grad, want)
    same, _ = topk_distill_loss(teacher_logp, ids, teacher_logp, mask, "reverse")
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_length_targets_in_system_turn_and_columns():
    ds = datasets.Dataset.from_list(
        [
            {
                "prompt": [
                    {"role": "system", "content": "Be exact.", "reasoning_content": None},
                    {"role": "user", "content": "2+2?", "reasoning_content": None},
                ],
                "answer": "4",
            },
            {"prompt": [{"role": "user", "content": "3+3?", "reasoning_content": None}], "answer": "6"},
        ]
    )
    cfg = LengthControlConfig(budgets=[256, 1024], styles=["concise"], seed=3)
    out = add_length_targets(ds, cfg)
    assert out["length_target"] == [sample_target(cfg, 0)[0], sample_target(cfg, 1)[0]]
    assert set(out["length_target"]) <= {256, 1024} and out["style"] == ["concise", "concise"]
    b0, b1 = out["length_target"]
    assert out[0]["prompt"][0]["content"] == f"Be exact.\n\nThink for at most {b0} tokens. Answer in a concise style."
    assert out[1]["prompt"][0] == {
        "role": "system",
        "content": f"Think for at most {b1} tokens. Answer in a concise style.",
        "reasoning_content": None,
    }
    assert add_length_targets(ds, cfg)["length_target"] == out["length_target"]  # deterministic
    none = add_length_targets(ds, LengthControlConfig(probability=0.0))
    assert none["length_target"] == [None, None] and none["prompt"] == ds["prompt"]
    many = [sample_target(LengthControlConfig(budgets=[1, 2, 3, 4]), i)[0] for i in range(40)]
    assert set(many) == {1, 2, 3, 4}


def _student_teacher_batch():
    from dsalign.alignment.rl import build_rl_batch
    from dsalign.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    student, teacher = Transformer(cfg), Transformer(cfg)
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)  # the same network, much sharper
    g = torch.Generator().manual_seed(1)
    completions = [torch.randint(3, cfg.vocab_size, (10,), generator=g).tolist() for _ in range(4)]
    return student, teacher.eval(), build_rl_batch([[1, 5, 7], [1, 9], [1, 5, 7], [1, 2, 3, 4]], completions, 0)


def test_teacher_scores_are_the_teachers_log_probs_at_completion_positions():
    from dsalign.alignment.distill import teacher_scores
    from dsalign.alignment.rl import token_logprobs

    _, teacher, batch = _student_teacher_batch()
    mask = batch["completion_mask"]
    scores = teacher_scores(teacher, batch, top_k=5)
    with torch.no_grad():
        want = token_logprobs(teacher, batch, positions=mask)[0]
        logp_all = torch.log_softmax(teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    torch.testing.assert_close(scores["teacher_logp"], want * mask, atol=1e-5, rtol=0)
    top = logp_all[:, :-1].topk(5, dim=-1)  # position t is scored by the logits at t - 1
    on = mask[:, 1:].bool()
    torch.testing.assert_close(scores["teacher_topk_logp"][:, 1:][on], top.values[on], atol=1e-5, rtol=0)
    assert torch.equal(scores["teacher_topk_ids"][:, 1:][on], top.indices[on])
    assert scores["teacher_topk_logp"][~mask.bool()].abs().sum() == 0  # nothing off the completions


def test_topk_reverse_kl_pulls_the_student_to_the_teacher():
    from dsalign.alignment.distill import teacher_scores, topk_distill_loss_fn

    student, teacher, batch = _student_teacher_batch()
    batch.update(teacher_scores(teacher, batch, top_k=8))
    loss_fn = topk_distill_loss_fn("reverse", aux_loss_coef=0.0)
    opt = torch.optim.AdamW(student.parameters(), lr=0.01)
    kls = []
    for _ in range(25):
        loss, metrics = loss_fn(student.train(), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        kls.append(metrics["distill_kl"])
    assert kls[0] > 0.2 and kls[-1] < 0.1 * kls[0], kls


def test_sampled_reverse_kl_gradient():
    """On-policy distillation's sampled loss (GRPO's loss with per-token advantage ``-(log p_S - log p_T)``, the
    ratio 1) has the gradient ``mean_t (log p_S - log p_T) grad log p_S``, the reverse KL's on the student's
    samples."""
    from dsalign.alignment.distill import teacher_scores
    from dsalign.alignment.policy_loss import PolicyLossConfig
    from dsalign.alignment.rl import grpo_loss_fn, token_logprobs

    student, teacher, batch = _student_teacher_batch()
    mask = batch["completion_mask"]
    with torch.no_grad():
        old = token_logprobs(student, batch, positions=mask)[0]
    t_logp = teacher_scores(teacher, batch, top_k=0)["teacher_logp"]
    gap = (old - t_logp) * mask
    loss, _ = grpo_loss_fn(PolicyLossConfig(), aux_loss_coef=0.0)(student, {**batch, "old_logp": old,
                                                                            "advantages": -gap})  # fmt: skip
    params = [p for p in student.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    logp = token_logprobs(student, batch, positions=mask)[0]
    want = torch.autograd.grad((gap * logp).sum() / mask.sum(), params, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_chunked_head_matches_one_chunk(direction):
    """Teacher scoring and the top-k loss a few rows at a time (the student's chunks recomputed in backward) give
    the values and gradients of one whole [N, V] chunk."""
    from dsalign.alignment.distill import teacher_scores, topk_distill_loss_fn

    student, teacher, batch = _student_teacher_batch()
    V = teacher.cfg.vocab_size
    whole, chunked = teacher_scores(teacher, batch, 6), teacher_scores(teacher, batch, 6, chunk_elements=3 * V)
    assert torch.equal(whole["teacher_topk_ids"], chunked["teacher_topk_ids"])
    for key in ("teacher_logp", "teacher_topk_logp"):  # GEMMs of other row counts round differently
        torch.testing.assert_close(whole[key], chunked[key], rtol=0, atol=1e-5, msg=key)
    batch.update(whole)
    params = [p for p in student.parameters() if p.requires_grad]
    results = []
    for elements in (1 << 30, 5 * V):  # one chunk; 5 rows per chunk (8 chunks for the 40 completion positions)
        loss, metrics = topk_distill_loss_fn(direction, aux_loss_coef=0.0, chunk_elements=elements)(student, batch)
        results.append((loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-7)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_length_targets_feed_target_length_and_mix_with_untargeted_string_prompts():
    """The budget column is the one ``target_length`` reads, and string prompts become conversations on every row,
    picked or not (a prompt column mixing strings and message lists cannot be stored)."""
    from dsalign.rewards import target_length

    cfg = LengthControlConfig(budgets=[4], probability=0.5, seed=0)
    picked = [sample_target(cfg, i)[0] is not None for i in range(8)]
    assert any(picked) and not all(picked)
    ds = datasets.Dataset.from_list([{"prompt": f"question {i}", "answer": str(i)} for i in range(8)])
    out = add_length_targets(ds, cfg)
    assert all(isinstance(p, list) and p[-1]["content"] == f"question {i}" for i, p in enumerate(out["prompt"]))
    assert [t is not None for t in out["length_target"]] == picked
    rewards = target_length(out["prompt"], ["abcd"] * 8, **{"length_target": out["length_target"]})
    assert rewards == [1.0 if p else None for p in picked]


def test_topk_distill_with_a_zero_probability_teacher_entry():
    """A teacher top-k log-prob of -inf (a masked token) adds nothing to the forward KL and a large but finite,
    gradient-carrying term to the reverse KL (it is unbounded in exact arithmetic)."""
    student = torch.zeros(1, 1, 3, requires_grad=True)
    ids = torch.tensor([[[0, 1, 2]]])
    teacher = torch.tensor([[[math.log(0.5), math.log(0.5), -math.inf]]])
    mask = torch.ones(1, 1)
    fwd, _ = topk_distill_loss(student, ids, teacher, mask, "forward")
    assert fwd.item() == pytest.approx(math.log(1.5))  # 2 * 1/2 ln((1/2) / (1/3))
    fwd.backward()
    assert torch.isfinite(student.grad).all()
    rev, _ = topk_distill_loss(student, ids, teacher, mask, "reverse")
    assert math.isfinite(rev.item()) and rev.item() > 20


def test_filter_counts_nan_rewards_as_incorrect_and_split_refuses_a_late_think():
    rows, stats = filter_traces([_trace("p", math.nan, WF.format(4)), _trace("p", 0.0, WF.format(5))],
                                TraceFilterConfig(min_reward=1.0))  # fmt: skip
    assert rows == [] and stats.incorrect == 2
    assert split_reasoning("reasoning</think>answer <think>") is None
