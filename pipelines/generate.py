"""``dsalign generate`` and ``dsalign chat``: the rollout engine behind the command line.

``generate`` reads a JSONL file of prompts (one object per line: ``"prompt"`` as text or as a list of chat
messages, or ``"prompt_ids"``) and writes one JSONL line per completion. ``chat`` is a streaming multi-turn chat
that renders the conversation with the checkpoint tokenizer's chat template (the DeepSeek-V3 template when the
tokenizer has none).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import torch

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_checkpoint_dir(path: str | Path, need_tokenizer: bool) -> Path:
    """Refuse, naming every missing file and what to do, a directory that cannot serve generation."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"checkpoint {path} is a file; give the checkpoint's directory")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json (the model configuration)")
    if not any((path / f).is_file() for f in _WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        missing.append("model.safetensors or model.safetensors.index.json + shards (the weights)")
    if need_tokenizer and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer.json / tokenizer_config.json (save the tokenizer with save_pretrained)")
    if missing:
        raise FileNotFoundError(
            f"checkpoint directory {path} is missing: " + "; ".join(missing) + ". Write checkpoints with "
            "dsalign.model.save_checkpoint (write_extra can add the tokenizer) or transformers' save_pretrained."
        )
    return path


def load_engine(
    checkpoint: str | Path,
    *,
    need_tokenizer: bool,
    max_batch_size: int = 8,
    max_len: int | None = None,
    speculative: bool = False,
    cache_dtype: str = "auto",
    dtype: str = "float32",
    device: str | None = None,
):
    """Load model (+ tokenizer when present) from an HF-format directory and wrap them in a ``RolloutEngine``.
    ``device``: where it runs (default: the GPU when torch sees one, else the CPU)."""
    from dsalign.alignment.rollout import RolloutEngine
    from dsalign.model import load_checkpoint

    from .stages import load_tokenizer

    path = check_checkpoint_dir(checkpoint, need_tokenizer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # the model first: a bad config.json is named by our reader, not by the tokenizer's (transformers') reading of it
    model = load_checkpoint(path, device=device, dtype=getattr(torch, dtype),
                            missing_mtp="error" if speculative else "drop")  # fmt: skip
    if max_len is not None and max_len > model.cfg.max_position_embeddings:
        raise ValueError(f"--max-len {max_len}: {path}'s model has max_position_embeddings "
                         f"{model.cfg.max_position_embeddings}; positions past it were never trained")  # fmt: skip
    tokenizer = load_tokenizer(path) if any((path / f).is_file() for f in _TOKENIZER_FILES) else None
    cache = {"auto": None, "fp8": "fp8", "bf16": torch.bfloat16, "fp32": torch.float32}[cache_dtype]
    return RolloutEngine(
        model, tokenizer, max_batch_size=max_batch_size, max_len=max_len, cache_dtype=cache, speculative=speculative
    )


def _sampling_params(args: Any, **extra: Any):
    from dsalign.alignment.sampling_params import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or None,
        **extra,
    )


PROMPT_KEYS = ("prompt", "text", "prompt_ids")


def _needs_tokenizer(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: {what} needs the checkpoint's tokenizer, and the checkpoint has no "
                      f"{' / '.join(_TOKENIZER_FILES)}; give prompt_ids instead, or save the tokenizer into the "
                      "checkpoint with save_pretrained")


def read_prompts(path: str | Path, engine) -> list[list[int]]:
    """Token ids of every prompt in a JSONL file; errors name the file and line.

    A row holds exactly one of: ``prompt`` (chat: a string is one user turn, or a list of messages; rendered with
    the chat template and the assistant generation prompt, exactly as GRPO/distillation prompt files are), ``text``
    (raw text continued as is, no template) or ``prompt_ids`` (token ids)."""
    from dsalign.alignment.chat import tokenize_prompt

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = []
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not an error
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line}: not valid UTF-8 (byte {raw[e.start]:#04x}); save the file as "
                         "UTF-8") from None  # fmt: skip
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        given = [k for k in PROMPT_KEYS if isinstance(row, dict) and k in row]
        if len(given) != 1:
            raise ValueError(f"{where}: expected an object with exactly one of {', '.join(PROMPT_KEYS)}, got "
                             f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")  # fmt: skip
        prompt = row[given[0]]
        if given[0] == "text" and engine.tokenizer is None:
            raise _needs_tokenizer(where, "a text prompt")
        if given[0] == "prompt_ids" and not isinstance(prompt, list):
            raise ValueError(f"{where}: prompt_ids must be a list of token ids, got {type(prompt).__name__}")
        if given[0] == "prompt":  # a chat prompt, as in the pipelines' prompt files: a string is one user turn
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}] if prompt else prompt
            if isinstance(prompt, list):
                if engine.tokenizer is None:
                    raise _needs_tokenizer(where, "a chat prompt")
                odd = next((m for m in prompt if not isinstance(m, dict)), None)
                if odd is not None:
                    raise ValueError(f"{where}: a chat prompt is a list of {{role, content}} messages, got an item "
                                     f"{odd!r} ({type(odd).__name__})")  # fmt: skip
                messages = [{"reasoning_content": None, **m} for m in prompt]
                prompt = tokenize_prompt(engine.tokenizer, messages, chat_template=engine.tokenizer.chat_template,
                                         where=where)  # fmt: skip
        prompts.append(engine.encode(prompt, where))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def run_generate(args: Any, out: IO[str] | None = None) -> int:
    out = out or sys.stdout  # the stream of the call, not of the import
    engine = load_engine(
        args.checkpoint,
        need_tokenizer=False,
        max_batch_size=args.batch_size,
        max_len=args.max_len,
        speculative=args.speculative,
        cache_dtype=args.cache_dtype,
        device=getattr(args, "device", None),
    )
    prompts = read_prompts(args.prompts, engine)
    params = _sampling_params(args, n=args.n)
    if args.seed is not None:  # one seed per prompt (as the pipelines' rollouts derive them), not one for all
        params = [replace(params, seed=args.seed * 1_000_003 + i) for i in range(len(prompts))]
    completions = engine.generate(prompts, params)
    rows = []
    for c in completions:
        row = {
            "index": c.request_index,
            "sample": c.sample_index,
            "text": c.text,
            "token_ids": c.token_ids,
            "logprobs": c.logprobs,
            "finish_reason": c.finish_reason,
        }
        rows.append(json.dumps(row) + "\n")
    if args.output:
        Path(args.output).write_text("".join(rows))
    else:
        out.write("".join(rows))
    s = engine.last_stats
    rate = s.generated_tokens / max(s.decode_s + s.prefill_s, 1e-9)
    msg = f"{s.completions} completions, {s.generated_tokens} tokens, {rate:.1f} tok/s"
    if engine.speculative:
        msg += f", MTP acceptance {s.acceptance_rate:.2f}"
    print(f"dsalign generate: {msg}", file=sys.stderr)
    return 0


class ChatSession:
    """A multi-turn conversation: each user turn renders the whole history with the chat template."""

    def __init__(self, engine, params, system: str | None = None):
        if engine.tokenizer is None:
            raise ValueError("chat needs the checkpoint's tokenizer")
        self.engine, self.params = engine, params
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, Any]] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system, "reasoning_content": None})

    def prompt_ids(self) -> list[int]:
        from dsalign.alignment.chat import tokenize_prompt

        tok = self.engine.tokenizer
        return tokenize_prompt(tok, self.messages, chat_template=getattr(tok, "chat_template", None))

    def send(self, text: str, stream: IO[str] | None = None) -> str:
        """Add a user turn, stream the reply to ``stream`` as it is generated, and add the reply to the history."""
        from dsalign.alignment.rollout import completion_text

        self.messages.append({"role": "user", "content": text, "reasoning_content": None})
        tok = self.engine.tokenizer
        stop_ids = self.engine.stop_ids(self.params)
        shown, tokens = "", []
        stops = self.params.stop_strings
        # a stop string is cut from the reply, so nothing that may still turn out to start one is shown early: the
        # last len(longest stop) - 1 characters wait until more text (or the end) decides
        hold = max(map(len, stops), default=1) - 1

        def on_token(_r: int, _s: int, ids: list[int]) -> None:
            nonlocal shown
            tokens.extend(ids)
            now = completion_text(tok, tokens, stop_ids)  # <think> tags shown: they mark the reasoning
            if stream is None or now.endswith("\ufffd"):
                return
            cut = min((now.index(s) for s in stops if s in now), default=None)
            visible = now[:cut] if cut is not None else now[: len(now) - hold]
            if visible.startswith(shown) and len(visible) > len(shown):
                stream.write(visible[len(shown) :])
                stream.flush()
                shown = visible

        try:
            reply = self.engine.generate([self.prompt_ids()], self.params, on_token=on_token)[0].text
        except ValueError:
            self.messages.pop()
            raise
        if stream is not None:
            stream.write(reply[len(shown) :] if reply.startswith(shown) else "\n" + reply)
            stream.write("\n")
        # the reply as generated, <think> block included: dsalign's template renders it back token for token; a
        # template that drops reasoning from the history (DeepSeek-R1's) finds it there to drop
        self.messages.append({"role": "assistant", "content": reply, "reasoning_content": None})
        return reply


def run_chat(args: Any, stdin: IO[str] | None = None, out: IO[str] | None = None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout  # the streams of the call, not of the import
    engine = load_engine(
        args.checkpoint, need_tokenizer=True, max_len=args.max_len, speculative=args.speculative, max_batch_size=1,
        device=getattr(args, "device", None),
    )
    session = ChatSession(engine, _sampling_params(args), system=args.system)
    out.write("dsalign chat: /reset clears the conversation, /exit (or end of input) quits\n")
    while True:
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            session.reset()
            continue
        if line.strip():
            try:
                session.send(line.rstrip("\n"), stream=out)
            except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the session
                out.write(f"[error: {e}]\n")
