"""DeepSeek-V3-style chat template and assistant-only loss masks for multi-turn SFT.

Rendered layout (DeepSeek-V3 / R1 ``tokenizer_config.json``)::

    <bos>{system}<｜User｜>{user}<｜Assistant｜><think>\\n{reasoning}\\n</think>\\n\\n{answer}<eos><｜User｜>...

The template is a Jinja string applied through the tokenizer's own ``apply_chat_template``, so the same text is
produced at training time, by the rollout engine and by anyone loading the saved tokenizer. Assistant turns are
wrapped in ``{% generation %}`` markers (usable with ``return_assistant_tokens_mask``), but the loss mask is
computed here by rendering prefixes instead: for the i-th assistant turn, the tokens between
``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])`` are the tokens the model
must produce. That definition does not depend on character offsets lining up with token boundaries, and it is
checked: if the token ids of a prefix are not a prefix of the full conversation's ids (a BPE merge across a turn
boundary), the conversation is refused rather than silently mis-masked.

``thinking=True`` puts ``<think>\\n`` into the generation prompt (R1 style: the model is forced to start
reasoning), so every assistant turn renders a think block, empty if the message has no ``reasoning_content``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

USER_TAG = "<｜User｜>"
ASSISTANT_TAG = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ROLES = ("system", "user", "assistant")

DEEPSEEK_V3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message may only come first') -}}{%- endif -%}"
    "{{- m['content'] -}}"
    "{%- elif m['role'] == 'user' -%}"
    "{{- '<｜User｜>' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- '<｜Assistant｜>' -}}"
    "{%- if thinking is defined and thinking -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- generation -%}"
    "{%- if thinking is defined and thinking -%}"
    "{{- (m['reasoning_content'] or '') + '\\n</think>\\n\\n' -}}"
    "{%- elif m['reasoning_content'] -%}"
    "{{- '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- m['content'] + eos_token -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('unknown role ' + m['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<｜Assistant｜>' -}}"
    "{%- if thinking is defined and thinking -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


class ConversationError(ValueError):
    """A conversation that cannot be rendered or masked; the message says which turn and why."""


@dataclass
class TokenizedConversation:
    """``input_ids`` of the whole rendered conversation and a 0/1 ``assistant_mask`` of the same length.
    ``full_length``: the token count before ``max_length`` truncation (equal to ``len(input_ids)`` when none)."""

    input_ids: list[int]
    assistant_mask: list[int]
    full_length: int = -1

    def __post_init__(self) -> None:
        if self.full_length < 0:
            self.full_length = len(self.input_ids)

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    def labels(self, ignore_index: int = -100) -> list[int]:
        """Token ids where the assistant speaks, ``ignore_index`` elsewhere (aligned with ``input_ids``)."""
        return [t if m else ignore_index for t, m in zip(self.input_ids, self.assistant_mask)]


def install_chat_template(tokenizer: Any, overwrite: bool = False) -> Any:
    """Set ``tokenizer.chat_template`` to the DeepSeek-V3 template (kept if one exists, unless ``overwrite``)."""
    if overwrite or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEEPSEEK_V3_TEMPLATE
    return tokenizer


def describe_value(value: Any, limit: int = 60) -> str:
    """``value`` for an error message: its type and a repr cut to ``limit`` characters (``None`` reads as null)."""
    if value is None:
        return "null (None)"
    if isinstance(value, list) and not value:
        return "an empty list"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= limit else text[: limit - 3] + '...'}"


def validate_messages(messages: Any, where: str = "conversation") -> list[dict[str, Any]]:
    """Check roles, contents and turn order; return the messages with ``reasoning_content`` always present.

    Rules: a list of ``{"role", "content"}`` dicts; ``system`` only first; every assistant turn follows a user
    turn. Prompts pass through here too, so an assistant turn is not required (``tokenize_conversation`` requires
    one). ``where`` prefixes the error (e.g. ``"data.jsonl line 4"``).
    """
    if not isinstance(messages, list) or not messages:
        got = describe_value(messages)
        raise ConversationError(f"{where}: 'messages' must be a non-empty list of {{role, content}} dicts, got {got}")
    out = []
    prev_role = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConversationError(f"{where}: messages[{i}] is {type(m).__name__}, expected a dict")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ConversationError(f"{where}: messages[{i}].role is {role!r}, expected one of {ROLES}")
        if not isinstance(content, str):
            raise ConversationError(f"{where}: messages[{i}].content is missing or not a string")
        if role == "system" and i != 0:
            raise ConversationError(f"{where}: messages[{i}] is a system message; only the first may be")
        if role == "assistant" and prev_role != "user":
            raise ConversationError(f"{where}: messages[{i}] is an assistant turn not preceded by a user turn")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ConversationError(f"{where}: messages[{i}].reasoning_content must be a string")
        out.append({"role": role, "content": content, "reasoning_content": reasoning})
        prev_role = role
    return out


def render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    thinking: bool = False,
    chat_template: str | None = None,
    where: str = "conversation",
) -> str:
    """Render messages to text through ``tokenizer.apply_chat_template`` (default: the DeepSeek-V3 template).

    A template's ``raise_exception`` (unknown role, misplaced system turn) surfaces as ``ConversationError`` prefixed
    with ``where``, not as a bare ``jinja2`` error from inside transformers."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template or DEEPSEEK_V3_TEMPLATE,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            thinking=thinking,
        )
    except TemplateError as e:
        raise ConversationError(f"{where}: the chat template refused the messages: {e}") from e


def _encode(tokenizer: Any, text: str) -> list[int]:
    # the template writes BOS itself, so the tokenizer must not add another
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    thinking: bool = False,
    chat_template: str | None = None,
    where: str = "prompt",
) -> list[int]:
    """Token ids of a prompt ending in the assistant generation tag (what the rollout engine continues).

    With the DeepSeek-V3 template the messages are checked first (``validate_messages``: roles, contents, order),
    so a prompt file's bad row (e.g. role ``human``) raises ``ConversationError`` naming ``where`` and the message;
    another template only knows its own rules, and its refusals are reported by ``render``."""
    if chat_template is None or chat_template == DEEPSEEK_V3_TEMPLATE:
        messages = validate_messages(messages, where)
    kw = {"thinking": thinking, "chat_template": chat_template, "where": where}
    return _encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True, **kw))


def tokenize_conversation(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    thinking: bool = False,
    max_length: int | None = None,
    chat_template: str | None = None,
    where: str = "conversation",
) -> TokenizedConversation:
    """Tokenize a multi-turn conversation and mark the tokens every assistant turn produces (see module doc).

    ``max_length`` truncates on the right; a conversation left with no assistant token is refused.
    """
    msgs = validate_messages(messages, where)
    if not any(m["role"] == "assistant" for m in msgs):
        raise ConversationError(f"{where}: no assistant turn to learn from")
    kw = {"thinking": thinking, "chat_template": chat_template, "where": where}
    full = _encode(tokenizer, render(tokenizer, msgs, **kw))
    mask = [0] * len(full)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = _encode(tokenizer, render(tokenizer, msgs[:i], add_generation_prompt=True, **kw))
        end = _encode(tokenizer, render(tokenizer, msgs[: i + 1], **kw))
        if full[: len(start)] != start or full[: len(end)] != end or len(end) <= len(start):
            raise ConversationError(
                f"{where}: assistant turn messages[{i}] does not tokenize as a continuation of its prompt (a token "
                "merges across the turn boundary); use a tokenizer with the role tags as special tokens"
            )
        mask[len(start) : len(end)] = [1] * (len(end) - len(start))
    full_length = len(full)
    if max_length is not None:
        full, mask = full[:max_length], mask[:max_length]
        if not any(mask):
            raise ConversationError(f"{where}: no assistant token left after truncation to {max_length} tokens")
    return TokenizedConversation(full, mask, full_length)
