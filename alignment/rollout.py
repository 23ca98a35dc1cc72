"""The rollout engine: batched generation on the MLA latent cache, with MTP speculative decoding.

GRPO and distillation spend most of their time here. The engine runs the policy model itself (no separate
inference server), so the log-probs it reports are the ones the trainer recomputes (docs/SPEC.md section 8).

How a ``generate`` call runs:

1. Prompts wait in a queue. When slots are free, a batch of waiting prompts is prefilled (naive MLA path) into a
   scratch cache; each prompt's cached latents, last logits and last hidden are stashed. Its ``n`` samples are then
   admitted one per free slot by copying the stashed rows into the engine's preallocated ``LatentCache``: the prompt
   is prefilled once however many samples it has.
2. Every decode step feeds each live slot's last token through the absorbed MLA path (attention over the cached
   latents, per-step cost dominated by the weights). A finished sequence frees its slot at once and the next waiting
   sample takes it (continuous batching), so a long straggler does not idle the batch.
3. With ``speculative=True`` the MTP module drafts the token after next (DeepSeek-V3 report, section 2.2 / 5.4.3):
   the main model verifies ``[last, draft]`` in one forward; greedy accepts iff the draft is the argmax, sampling uses
   the speculative-sampling rule (``sampling_params.speculative_accept``), so outputs keep their distribution.
   The MTP block keeps its own layer in the same cache (layer index ``num_hidden_layers``). State per live row:
   ``n`` tokens fed to both the main and MTP layers, one committed token not yet fed, one draft for the position
   after it.

Shape legend: B slots, T tokens per step, D hidden, V vocabulary.
"""

from __future__ import annotations

import contextlib
import numbers
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from dsalign.kernels.grouped_gemm import autocast_dtype, caching_autocast_weights, invalidate_weight_caches
from dsalign.model import FP8LatentCache, LatentCache, Transformer, build_attention_mask
from torch import Tensor

from .sampling_params import SamplingParams, draw, policy_logprobs, sampling_probs, speculative_accept

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass
class Completion:
    """One sampled completion. ``logprobs[i]`` is the policy log-prob of ``token_ids[i]`` (temperature-scaled)."""

    request_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    text: str | None = None
    drafted: int = 0  # speculative decoding: MTP drafts verified for this completion, and how many were accepted
    accepted: int = 0


def completion_text(tokenizer: Any, token_ids: Sequence[int], stop_ids: Collection[int] = ()) -> str:
    """A completion's text as generated: every token decoded, special tags such as ``<think>`` / ``</think>``
    included (they are the reply's format, and rewards read them), except a final stop token (EOS), which only
    ends it."""
    ids = list(token_ids)
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


@dataclass
class GenerationStats:
    prompts: int = 0
    completions: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class _Prefilled:
    """A prompt's shared prefill: its cache rows (in a scratch cache), last logits and last hidden."""

    cache: LatentCache
    row: int
    logits_V: Tensor
    hidden_D: Tensor
    next_sample: int = 0


@dataclass
class _Seq:
    request: int
    sample: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    draft: int = -1
    draft_probs: Tensor | None = None
    drafted: int = 0
    accepted: int = 0
    finish: str | None = None
    stop_reason: int | str | None = None


class _EPLockstep:
    """Keeps the ranks of an expert-parallel group running forwards in step while they generate.

    Every MoE layer of an expert-sharded model exchanges tokens with ``all_to_all`` over the group, so each rank
    must run as many forwards of each kind (main model, MTP module: they hold different numbers of MoE layers) as
    the others, in the same order. But each rank decodes its own prompts, and its number of forwards follows its
    own completions' lengths (and, with dynamic sampling, its number of ``generate`` calls). So before each forward
    the group agrees (one ``all_reduce(MIN)`` of a kind code) on which kind runs next: the ranks that want that kind
    run theirs, the others run the same kind on one dummy token and ask again; a rank with nothing left to run
    (``drain``) keeps serving dummies until every rank is done.
    """

    ABORT, MODEL, MTP, IDLE = -1, 0, 1, 2

    def __init__(self, model: Transformer, group):
        from dsalign.alignment.trainer.step import collective_device  # an EP group exists only beside a trainer

        self.model, self.group = model, group
        self.device = collective_device(group)
        self.deferred = 0  # > 0 inside ``phase()``: drain at its end, not after each generate call
        self.dummy_forwards = 0
        # True once the group needs no abort for the current failure: the ABORT was exchanged (sent or received),
        # or an error escaped a forward (between the MoE all-to-alls, where the others wait inside a collective
        # that an abort's all-reduce cannot meet: they are left to the process group's timeout). Reset by
        # ``generate`` and ``ep_phase`` on entry.
        self.settled = False

    @staticmethod
    def for_model(model: Transformer) -> _EPLockstep | None:
        from dsalign.model.moe import GroupedExperts

        groups = {id(m.ep_group): m.ep_group for m in model.modules() if isinstance(m, GroupedExperts) and
                  m.ep_group is not None}  # fmt: skip
        if not groups:
            return None
        if len(groups) > 1:
            raise ValueError("RolloutEngine: the model's MoE layers use different expert-parallel groups")
        group = next(iter(groups.values()))
        return _EPLockstep(model, group) if torch.distributed.get_world_size(group) > 1 else None

    def _agree(self, want: int) -> int:
        t = torch.tensor([want], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
        turn = int(t.item())
        if turn == self.ABORT:
            self.settled = True  # every rank has seen it
        if turn == self.ABORT and want != self.ABORT:
            raise RuntimeError("generate: another rank of the expert-parallel group failed (its own error says "
                               "why); this rank stops too instead of waiting for it")  # fmt: skip
        return turn

    def abort(self) -> None:
        """Called by a rank that fails outside a forward (its requests failed validation, its scorer raised inside an
        ``ep_phase``, a callback raised): the others, waiting to agree on the next forward, raise instead of waiting
        for this rank until the group's timeout. Once per failure; nothing after an error inside a forward."""
        if not self.settled:
            self._agree(self.ABORT)

    def run(self, kind: int, forward: Callable[[], Any]) -> Any:
        while (turn := self._agree(kind)) != kind:
            self._forward(lambda: self._dummy(turn))
        return self._forward(forward)

    def _forward(self, forward: Callable[[], Any]) -> Any:
        try:
            return forward()
        except BaseException:
            self.settled = True
            raise

    def drain(self) -> None:
        was_training = self.model.training  # between generate calls a colocated trainer may hold it in train mode
        self.model.eval()
        try:
            with caching_autocast_weights():  # one cast of each expert stack for all the dummy forwards
                while (turn := self._agree(self.IDLE)) != self.IDLE:
                    self._forward(lambda: self._dummy(turn))
        finally:
            self.model.train(was_training)

    def _dummy(self, kind: int) -> None:
        """One forward of ``kind`` on a single token, output discarded: it only takes part in the collectives."""
        self.dummy_forwards += 1
        device = next(self.model.parameters()).device
        x = torch.zeros(1, 1, dtype=torch.long, device=device)
        if kind == self.MODEL:
            self.model(x, return_logits=False, compute_mtp=False)
            return
        pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        h = torch.zeros(1, 1, self.model.cfg.hidden_size, dtype=next(self.model.parameters()).dtype, device=device)
        self.model.mtp[0](h, self.model.embed_tokens(x), self.model.rotary(pos), None, None)


class RolloutEngine:
    """Generate completions for batches of prompts with ``model`` (kept in eval mode, updated in place).

    Args:
        model: a ``dsalign.model.Transformer``; its dtype is the compute dtype.
        tokenizer: optional HF tokenizer, for string prompts, stop strings and ``Completion.text``.
        max_batch_size: decode slots (sequences decoded together).
        max_len: context per slot, prompt + completion (default: ``model.cfg.max_position_embeddings``); the cache
            itself is sized per call to the longest prompt + ``max_new_tokens`` it can reach.
        cache_dtype: latent dtype (default: the model's); ``"fp8"`` uses ``FP8LatentCache``.
        speculative: draft one token per step with ``model.mtp[0]`` and verify it.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any = None,
        *,
        max_batch_size: int = 8,
        max_len: int | None = None,
        cache_dtype: torch.dtype | str | None = None,
        speculative: bool = False,
    ):
        self.model = model.eval()
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_len = max_len or self.cfg.max_position_embeddings
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.fp8_cache = cache_dtype == "fp8"
        self.explicit_cache_dtype = None if cache_dtype in (None, "fp8") else cache_dtype
        if speculative and not len(model.mtp):
            raise ValueError("speculative=True needs an MTP module (the model has num_nextn_predict_layers=0)")
        self.speculative = speculative
        self.num_layers = self.cfg.num_hidden_layers + (1 if speculative else 0)
        self.cache: LatentCache | None = None  # allocated by generate, sized to what the call can reach
        eos = self.cfg.eos_token_id
        self.default_stop_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos) | frozenset(
            getattr(model, "generation_eos_token_ids", ()))  # a checkpoint's generation_config.json: load_checkpoint
        self.last_stats = GenerationStats()
        # expert-sharded model (colocated with an EP trainer): forwards run in step across the EP group
        self._lockstep = _EPLockstep.for_model(model)

    def _forward(self, kind: int, forward: Callable[[], Any]) -> Any:
        return forward() if self._lockstep is None else self._lockstep.run(kind, forward)

    @contextlib.contextmanager
    def ep_phase(self):
        """With an expert-sharded model, a span of ``generate`` calls after which the EP group meets: use it when
        ranks may call ``generate`` a different number of times (dynamic sampling), since each call's end would
        otherwise wait for the other ranks' matching call. A no-op without expert parallelism."""
        if self._lockstep is None:
            yield
            return
        self._lockstep.deferred += 1
        self._lockstep.settled = False
        try:
            yield
        except BaseException:
            self._lockstep.deferred -= 1
            self._lockstep.abort()  # e.g. this rank's scorer raised between generate calls: the others raise too
            raise
        self._lockstep.deferred -= 1
        if not self._lockstep.deferred:
            with torch.inference_mode():
                self._lockstep.drain()

    def _latent_dtype(self) -> torch.dtype:
        """The cache's latent (FP8 cache: read-back) dtype: the one given, else under an autocast of the engine's
        device its dtype (attention would cast fp32 latents to it on every decode step, the whole context each
        time), else the model's."""
        if self.explicit_cache_dtype is not None:
            return self.explicit_cache_dtype
        return autocast_dtype(self.device.type) or self.dtype

    def _new_cache(self, batch: int, length: int, device: torch.device | str | None = None) -> LatentCache:
        kind = FP8LatentCache if self.fp8_cache else LatentCache
        return kind(self.cfg, batch, length, num_layers=self.num_layers, dtype=self._latent_dtype(),
                    device=device or self.device)  # fmt: skip

    def _ensure_cache(self, ids: list[list[int]], params: Sequence[SamplingParams]) -> None:
        """Preallocate the slots' cache for the longest sequence this call can produce (kept for later calls;
        grown only when a call needs more). One extra position lets a verify step hold the draft of a sequence at
        the context's last token."""
        need = min(self.max_len, max(len(i) + p.max_new_tokens for i, p in zip(ids, params))) + 1
        if self.cache is None or self.cache.max_len < need or self.cache.latent_dtype != self._latent_dtype():
            self.cache = None  # free the old buffer before allocating the new one
            self.cache = self._new_cache(self.max_batch_size, need)

    def cache_bytes_per_token(self) -> int:
        """Latent-cache bytes one token costs across the main model's layers (MTP's layer not counted)."""
        probe = self._new_cache(1, 1, device="meta")
        return probe.bytes_per_token() * self.cfg.num_hidden_layers // self.num_layers

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> int:
        """Copy a trainer's parameters into the engine's model in place (same names as ``Transformer``).

        FP8 weight caches are invalidated, so quantized copies are rebuilt from the new weights. Returns the number
        of tensors copied. ``strict`` refuses a state dict missing any of the model's parameters.
        """
        own = dict(self.model.named_parameters())
        own.update(self.model.named_buffers())
        unknown = sorted(k for k in state_dict if k not in own)
        if unknown:
            raise KeyError(f"update_weights: {len(unknown)} names the model does not have, e.g. {unknown[:5]}")
        missing = sorted(k for k in dict(self.model.named_parameters()) if k not in state_dict)
        if strict and missing:
            raise KeyError(f"update_weights: state dict lacks {len(missing)} parameters, e.g. {missing[:5]}")
        for name, value in state_dict.items():
            dst = own[name]
            if dst.shape != value.shape:
                raise ValueError(f"update_weights: {name} has shape {tuple(value.shape)}, model has {tuple(dst.shape)}")
            dst.copy_(value.detach())
        invalidate_weight_caches(self.model)
        return len(state_dict)

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Sequence[int] | str, where: str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{where}: a string prompt needs a tokenizer (pass tokenizer= or token ids)")
            ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        elif isinstance(prompt, Tensor) and prompt.dim() == 1:
            if prompt.is_floating_point() or prompt.dtype == torch.bool:
                raise TypeError(f"{where}: token ids must be integers, got a {prompt.dtype} tensor")
            ids = [int(t) for t in prompt]
        elif isinstance(prompt, (list, tuple)):
            bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
            if bad:
                raise TypeError(f"{where}: token ids must be integers, got {bad[0]!r} ({type(bad[0]).__name__})")
            ids = [int(t) for t in prompt]
        else:
            raise TypeError(f"{where}: a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"{where}: empty prompt (at least one token is needed to condition on)")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"{where}: token ids {bad[:5]} outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(ids) >= self.max_len:
            raise ValueError(
                f"{where}: prompt of {len(ids)} tokens does not fit the context of {self.max_len} tokens "
                "(prompt + at least one generated token); shorten it or raise max_len"
            )
        return ids

    # ------------------------------------------------------------------ generate
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int] | str],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_token: Callable[[int, int, list[int]], None] | None = None,
    ) -> list[Completion]:
        """Complete every prompt ``params.n`` times. Returns completions ordered by (prompt, sample).

        ``params`` is one ``SamplingParams`` for all prompts or one per prompt. ``on_token(request, sample, ids)``
        is called with each sequence's newly committed token ids (streaming).
        """
        if self._lockstep is not None:
            self._lockstep.settled = False
        if not prompts:
            self._finish_ep()  # this rank has nothing to decode; the others may
            return []
        try:
            params, ids = self._validate(prompts, params)
        except Exception:
            if self._lockstep is not None:  # the other EP ranks would wait for this one's forwards
                self._lockstep.abort()
            raise
        was_training = self.model.training  # a colocated trainer may have switched the shared model to train mode
        self.model.eval()
        try:
            with caching_autocast_weights():  # the experts' autocast copies serve this call's decode steps only
                out = self._run(ids, params, on_token)
            self._finish_ep()
            return out
        except BaseException:
            if self._lockstep is not None and not self._lockstep.deferred:  # inside ep_phase, the phase aborts
                self._lockstep.abort()  # a no-op after an error inside a forward
            raise
        finally:
            self.model.train(was_training)

    def _validate(self, prompts, params) -> tuple[list[SamplingParams], list[list[int]]]:
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        for p in params:
            if p.stop_strings and self.tokenizer is None:
                raise ValueError("generate: stop strings need a tokenizer (pass tokenizer= to the engine)")
            p.validate()
        return params, [self.encode(p, f"prompt {i}") for i, p in enumerate(prompts)]

    def _finish_ep(self) -> None:
        if self._lockstep is not None and not self._lockstep.deferred:
            self._lockstep.drain()

    def _run(self, ids: list[list[int]], params: Sequence[SamplingParams], on_token) -> list[Completion]:
        self._ensure_cache(ids, params)
        self.cache.reset()
        self.last_stats = stats = GenerationStats(prompts=len(ids), prompt_tokens=sum(map(len, ids)))
        self._on_token = on_token
        waiting = deque(range(len(ids)))
        stash: dict[int, _Prefilled] = {}
        slots: list[_Seq | None] = [None] * self.max_batch_size
        done: list[Completion] = []
        while waiting or stash or any(s is not None for s in slots):
            free = [i for i, s in enumerate(slots) if s is None]
            if free and (waiting or stash):
                t0 = time.perf_counter()
                self._admit(free, slots, waiting, stash, ids, params, done)
                stats.prefill_s += time.perf_counter() - t0
                if all(s is None for s in slots):  # every admitted sample finished on its first token
                    continue
            t0 = time.perf_counter()
            if self.speculative:
                self._spec_step(slots, done)
            else:
                self._step(slots, done)
            stats.decode_steps += 1
            stats.decode_s += time.perf_counter() - t0
        done.sort(key=lambda c: (c.request_index, c.sample_index))
        stats.completions = len(done)
        stats.generated_tokens = sum(len(c.token_ids) for c in done)
        return done

    # ------------------------------------------------------------------ admission
    def _admit(self, free, slots, waiting, stash, ids, params, done) -> None:
        """Fill free slots with samples of already-prefilled prompts, prefilling more prompts as needed."""
        need = len(free) - sum(params[r].n - p.next_sample for r, p in stash.items())
        batch = []
        # prefill only what the free slots need beyond the samples already waiting in the stash: a stashed prompt
        # holds its scratch cache until its last sample is admitted
        while waiting and need > 0 and len(batch) < self.max_batch_size:
            r = waiting.popleft()
            batch.append(r)
            need -= params[r].n
        if batch:
            self._prefill(batch, ids, stash)
        admitted = []
        for r in list(stash):
            pre = stash[r]
            while free and pre.next_sample < params[r].n:
                seq = self._new_seq(r, pre.next_sample, ids[r], params[r])
                pre.next_sample += 1
                slot = free[0]
                self._sample_first(seq, pre.logits_V, done)
                if seq.finish is not None:
                    continue
                free.pop(0)
                self.cache.copy_rows(pre.cache, pre.row, slot, len(ids[r]))
                slots[slot] = seq
                admitted.append((slot, pre.hidden_D))
            if pre.next_sample >= params[r].n:
                del stash[r]
        if self.speculative and admitted:
            self._draft_after_admit(slots, admitted)

    def _new_seq(self, r: int, j: int, prompt: list[int], p: SamplingParams) -> _Seq:
        g = torch.Generator(device="cpu")
        seed = p.sample_seed(j)
        g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        return _Seq(r, j, prompt, p, g, self.stop_ids(p))

    def stop_ids(self, p: SamplingParams) -> frozenset[int]:
        """The tokens that end a sample under ``p``: its ``stop_token_ids``, and EOS unless ``ignore_eos``."""
        return frozenset(p.stop_token_ids or ()) | (frozenset() if p.ignore_eos else self.default_stop_ids)

    def _prefill(self, batch: list[int], ids: list[list[int]], stash: dict[int, _Prefilled]) -> None:
        """Naive-path prefill of a batch of prompts into a scratch cache (plus the MTP layer over positions
        0..P-2, whose inputs are all known from the prompt)."""
        lens = [len(ids[r]) for r in batch]
        P = max(lens)
        x = torch.zeros(len(batch), P, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(batch), P, dtype=torch.bool, device=self.device)
        for i, r in enumerate(batch):
            x[i, : lens[i]] = torch.tensor(ids[r], device=self.device)
            mask[i, : lens[i]] = True
        self.last_stats.prefill_tokens += sum(lens)
        scratch = self._new_cache(len(batch), P)
        # only each prompt's last position needs logits: the head over all [B, P] positions would materialize
        # B x P x vocab floats (GBs at a 129k vocabulary) for B rows of them
        out = self._forward(
            _EPLockstep.MODEL, lambda: self.model(x, attention_mask=mask.long(), cache=scratch, return_logits=False)
        )
        last = torch.tensor(lens, device=self.device) - 1
        rows = torch.arange(len(batch), device=self.device)
        logits_BV = self.model.lm_head(out.hidden[rows, last])
        hidden = self._mtp_input_hidden(out)
        if self.speculative and P > 1:
            pos = torch.arange(P, device=self.device)[None].expand(len(batch), P)
            valid = mask & (pos < last[:, None])
            nxt = torch.nn.functional.pad(x[:, 1:], (0, 1))
            attn = build_attention_mask(pos, valid, None)
            mtp, emb, rope = self.model.mtp[0], self.model.embed_tokens(nxt), self.model.rotary(pos)
            self._forward(_EPLockstep.MTP, lambda: mtp(hidden, emb, rope, attn, valid, scratch, pos))
        last_hidden = hidden[rows, last]  # a copy: the stash must not keep the whole [B, P, D] alive
        for i, r in enumerate(batch):
            stash[r] = _Prefilled(scratch, i, logits_BV[i], last_hidden[i])

    def _mtp_input_hidden(self, out) -> Tensor:
        return out.hidden if self.cfg.mtp_hidden == "post_norm" else out.hidden_pre

    # ------------------------------------------------------------------ committing tokens
    def _sample_first(self, seq: _Seq, logits_V: Tensor, done: list[Completion]) -> None:
        """Sample an admitted sample's first token from its prompt's last logits."""
        probs = sampling_probs(logits_V[None], *self._knobs([seq]))
        tok = int(draw(probs, self._uniforms([seq]))[0])
        temps = torch.tensor([float(seq.params.temperature)], device=self.device)
        lp = policy_logprobs(logits_V[None], temps, torch.tensor([tok], device=self.device))
        self._append(seq, [tok], lp.tolist(), done)

    def _append(self, seq: _Seq, toks: list[int], lps: list[float], done: list[Completion]) -> int:
        """Append tokens and their policy log-probs until a stop or the length cap. Returns how many were kept."""
        kept = 0
        for tok, lp in zip(toks, lps):
            seq.tokens.append(tok)
            seq.logprobs.append(lp)
            kept += 1
            if tok in seq.stop_ids:
                seq.finish, seq.stop_reason = FINISH_STOP, tok
            elif self._hit_stop_string(seq):
                seq.finish = FINISH_STOP
            elif len(seq.tokens) >= seq.params.max_new_tokens or len(seq.prompt) + len(seq.tokens) >= self.max_len:
                seq.finish = FINISH_LENGTH
            if seq.finish is not None:
                break
        if self._on_token is not None:
            self._on_token(seq.request, seq.sample, seq.tokens[-kept:])
        if seq.finish is not None:
            done.append(self._completion(seq))
        return kept

    def _hit_stop_string(self, seq: _Seq) -> bool:
        stops = seq.params.stop_strings
        if not stops:
            return False
        window = 4 * max(map(len, stops)) + 8
        tail = self.tokenizer.decode(seq.tokens[-window:], skip_special_tokens=False)
        for s in stops:
            if s in tail:
                seq.stop_reason = s
                return True
        return False

    def _completion(self, seq: _Seq) -> Completion:
        text = None
        if self.tokenizer is not None:
            text = completion_text(self.tokenizer, seq.tokens, seq.stop_ids)
            if isinstance(seq.stop_reason, str) and seq.stop_reason in text:
                text = text[: text.index(seq.stop_reason)]
        return Completion(seq.request, seq.sample, seq.prompt, seq.tokens, seq.logprobs, seq.finish, seq.stop_reason,
                          text, seq.drafted, seq.accepted)  # fmt: skip

    def _knobs(self, seqs: Sequence[_Seq]) -> tuple[Tensor, Tensor, Tensor]:
        temps = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=self.device)
        top_k = torch.tensor([s.params.top_k for s in seqs], dtype=torch.long, device=self.device)
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=self.device)
        return temps, top_k, top_p

    def _uniforms(self, seqs: Sequence[_Seq]) -> Tensor:
        return torch.cat([torch.rand(1, generator=s.generator) for s in seqs]).to(self.device)

    # ------------------------------------------------------------------ plain decode
    def _step(self, slots: list[_Seq | None], done: list[Completion]) -> None:
        n = self._compact(slots)
        seqs = slots[:n]
        x = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        cache = self.cache if n == len(slots) else self.cache.first_rows(n)
        logits = self._forward(_EPLockstep.MODEL, lambda: self.model(x, cache=cache)).logits[:, 0]
        knobs = self._knobs(seqs)
        probs = sampling_probs(logits, *knobs)
        toks = draw(probs, self._uniforms(seqs))
        lps = policy_logprobs(logits, knobs[0], toks).tolist()
        for i, tok in enumerate(toks.tolist()):
            self._append(slots[i], [tok], [lps[i]], done)
            self._free_if_done(slots, i)

    def _compact(self, slots: list[_Seq | None]) -> int:
        """Move the live sequences into the lowest slots (their cache rows with them) and return how many there
        are, so that a decode step runs only the rows holding a sequence: as sequences finish at different lengths
        the step shrinks instead of carrying empty rows through every layer. A sequence's tokens, seed stream and
        cached latents move unchanged, so what it samples does not depend on where it sits."""
        live = [i for i, s in enumerate(slots) if s is not None]
        n = len(live)
        holes = [i for i in range(n) if slots[i] is None]
        movers = [i for i in live if i >= n]
        for dst, src in zip(holes, movers):
            self.cache.copy_rows(self.cache, src, dst, int(self.cache.lengths[src]))
            slots[dst], slots[src] = slots[src], None
            self.cache.reset([src])
        return n

    def _free_if_done(self, slots: list[_Seq | None], i: int) -> None:
        if slots[i] is not None and slots[i].finish is not None:
            slots[i] = None
            self.cache.reset([i])

    # ------------------------------------------------------------------ speculative decode
    def _run_mtp(self, h_BTD: Tensor, next_ids_BT: Tensor, pos_BT: Tensor, valid_BT: Tensor, pick_B: Tensor) -> Tensor:
        """MTP block over the cache (absorbed path) at ``pos_BT``; logits [B, V] at column ``pick_B`` of each row."""
        module = self.model.mtp[0]
        live_pos = pos_BT[valid_BT]
        upto = int(live_pos.max()) + 1 if live_pos.numel() else 1
        mask = build_attention_mask(pos_BT, key_positions_S=torch.arange(upto, device=self.device))
        emb = self.model.embed_tokens(next_ids_BT)
        rope = self.model.rotary(pos_BT)
        h, _ = self._forward(
            _EPLockstep.MTP, lambda: module(h_BTD, emb, rope, mask, valid_BT, self.cache, pos_BT, absorbed=True)
        )
        rows = torch.arange(h.shape[0], device=self.device)
        return self.model.lm_head(module.norm(h[rows, pick_B]))

    def _set_drafts(self, slots, live: list[int], logits_BV: Tensor) -> None:
        seqs = [slots[i] for i in live]
        idx = torch.tensor(live, device=self.device)
        q = sampling_probs(logits_BV[idx], *self._knobs(seqs))
        drafts = draw(q, self._uniforms(seqs))
        for j, s in enumerate(seqs):
            s.draft, s.draft_probs = int(drafts[j]), q[j]

    def _draft_after_admit(self, slots, admitted: list[tuple[int, Tensor]]) -> None:
        """Catch the MTP layer up to position P-1 for newly admitted rows (its input there is the sampled t_P)."""
        B = len(slots)
        h = torch.zeros(B, 1, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        nxt = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        pos = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        valid = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        for slot, h_D in admitted:
            seq = slots[slot]
            h[slot, 0], nxt[slot, 0], pos[slot, 0], valid[slot, 0] = h_D, seq.tokens[-1], len(seq.prompt) - 1, True
        logits = self._run_mtp(h, nxt, pos, valid, torch.zeros(B, dtype=torch.long, device=self.device))
        self._set_drafts(slots, [s for s, _ in admitted], logits)

    def _spec_step(self, slots: list[_Seq | None], done: list[Completion]) -> None:
        B = len(slots)
        live = [i for i, s in enumerate(slots) if s is not None]
        seqs = [slots[i] for i in live]
        idx = torch.tensor(live, device=self.device)
        x = torch.tensor([[s.tokens[-1], s.draft] if s is not None else [0, 0] for s in slots], device=self.device)
        valid = torch.tensor([[s is not None] * 2 for s in slots], device=self.device)
        start = self.cache.lengths.clone()
        pos = start[:, None] + torch.arange(2, device=self.device)[None]
        out = self._forward(
            _EPLockstep.MODEL,
            lambda: self.model(x, attention_mask=valid.long(), position_ids=pos, cache=self.cache, absorbed=True),
        )
        logits = out.logits[idx]  # [b, 2, V]
        knobs = self._knobs(seqs)
        p0 = sampling_probs(logits[:, 0], *knobs)
        p1 = sampling_probs(logits[:, 1], *knobs)
        q = torch.stack([s.draft_probs for s in seqs])
        drafts = torch.tensor([s.draft for s in seqs], device=self.device)
        u_acc, u_res = self._uniforms(seqs), self._uniforms(seqs)
        accepted, first = speculative_accept(p0, q, drafts, u_acc, u_res)
        bonus = draw(p1, u_res)  # u_res is only used by the branch that happened
        stats = self.last_stats
        stats.drafted += len(live)
        stats.accepted += int(accepted.sum())
        acc = torch.zeros(B, dtype=torch.bool, device=self.device)
        acc[idx] = accepted
        # a rejected row keeps only position n: roll its length back over the draft's stale latent
        self.cache.lengths[idx] -= (~accepted).long()
        new_tok = torch.zeros(B, 2, dtype=torch.long, device=self.device)
        new_tok[idx, 0], new_tok[idx, 1] = first, torch.where(accepted, bonus, torch.zeros_like(bonus))
        lp_first = policy_logprobs(logits[:, 0], knobs[0], first).tolist()
        lp_bonus = policy_logprobs(logits[:, 1], knobs[0], bonus).tolist()
        first, bonus, accepted_l = first.tolist(), bonus.tolist(), accepted.tolist()
        for j, i in enumerate(live):
            slots[i].drafted += 1
            slots[i].accepted += accepted_l[j]
            if accepted_l[j]:
                self._append(slots[i], [first[j], bonus[j]], [lp_first[j], lp_bonus[j]], done)
            else:
                self._append(slots[i], [first[j]], [lp_first[j]], done)
        still = [i for i in live if slots[i].finish is None]
        for i in live:
            self._free_if_done(slots, i)
        if not still:
            return
        h = self._mtp_input_hidden(out)
        mvalid = torch.zeros(B, 2, dtype=torch.bool, device=self.device)
        rows = torch.tensor(still, device=self.device)
        mvalid[rows, 0], mvalid[rows, 1] = True, acc[rows]
        logits_mtp = self._run_mtp(h, new_tok, pos, mvalid, acc.long())
        self._set_drafts(slots, still, logits_mtp)
