"""The reward-function contract, the registry of built-ins, and loading user rewards by name or path.

A reward is any callable with TRL's signature::

    fn(prompts, completions, completion_ids=None, **columns) -> list[float | None] | dict[str, list[float | None]]

``columns`` carries every other dataset column (``answer``, ``tests``, ...), one value per sample. ``None`` means
"not applicable to this sample" and is excluded from the weighted sum (see ``combine.py``). ``async def`` rewards are
allowed. Keeping TRL's signature means every reward written for ``trl.GRPOTrainer`` works here unchanged. verl's
``compute_score(data_source, solution_str, ground_truth, extra_info)`` works too: ``load_reward`` recognizes the
signature and adapts it (``from_verl``).

Completions (and prompts) arrive either as plain strings or, for chat datasets, as TRL's conversational form: a list
of ``{"role", "content"}`` messages. Built-ins read them through :func:`completion_text` so they accept both.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any

RewardFn = Callable[..., Any]

_REGISTRY: dict[str, RewardFn] = {}


class RewardLoadError(ImportError):
    """A reward spec could not be turned into a callable; the message names the spec and what failed."""


class RewardSignatureError(RewardLoadError, ValueError):
    """The reward loaded but cannot be called the way the combiner calls it, or ``params`` do not fit it.

    Also a ``ValueError`` (the config is wrong, not the installation), and a ``RewardLoadError`` so that one
    ``except`` still catches every load failure.
    """


def completion_text(completion: Any) -> str:
    """Text of one completion (or prompt), whether a plain string or a TRL conversational message list.

    For a message list that has ``assistant`` messages (a completion), only their text is used: in a tool-using
    completion the ``tool`` messages are the tools' output, not the model's answer, and must not be graded as it.
    A list without assistant messages (a prompt) joins every message. ``content`` may be ``None`` (an assistant turn
    that only calls a tool) or a list of parts (``{"type": "text", "text": ...}``); non-text parts are skipped.

    >>> completion_text("plain")
    'plain'
    >>> completion_text([{"role": "assistant", "content": "hi"}])
    'hi'
    >>> completion_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}])
    'Be brief.\\n2+2?'
    >>> completion_text([{"role": "assistant", "content": None, "tool_calls": [{"name": "calc"}]},
    ...                  {"role": "tool", "content": "4"}, {"role": "assistant", "content": "It is 4."}])
    'It is 4.'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        said = [m for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
        texts = [completion_text(message) for message in (said or completion)]
        return "\n".join(text for text in texts if text)
    raise TypeError(f"expected a string or a list of {{'role', 'content'}} messages, got {type(completion).__name__}")


def _content_text(content: Any) -> str:
    """A message's ``content``: a string, ``None`` (no text), or a list of typed parts of which the text ones count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = [p.get("text") if isinstance(p, dict) else p for p in content]
        return "\n".join(p for p in parts if isinstance(p, str) and p)
    return str(content)


def last_user_text(prompt: Any) -> str:
    """The user's words in a prompt: the last ``user`` message of a conversation, or the string itself.

    >>> last_user_text([{"role": "system", "content": "sys"}, {"role": "user", "content": "Bonjour"}])
    'Bonjour'
    """
    if isinstance(prompt, (list, tuple)):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return completion_text(users[-1]) if users else completion_text(prompt)
    return completion_text(prompt)


def trl_reward_inputs(prompts: Sequence[Any], texts: Sequence[str], text_prompt: Sequence[bool]) -> tuple[list, list]:
    """The ``prompts`` and ``completions`` a reward receives, in TRL's two formats, one per call as in
    ``GRPOTrainer``: when every sample's dataset prompt was a string ("standard"), those strings and the
    completions' texts; otherwise ("conversational") every prompt as its messages and every completion as
    ``[{"role": "assistant", "content": text}]`` (a file mixing the two gets the conversational form for all).
    ``prompts`` are message lists (the loaders turn a string prompt into one user turn and remember it in
    ``text_prompt``); a string prompt's text is its user turn (a system turn the pipeline added, such as a length
    budget, is not part of it). Message keys whose value is None (``reasoning_content`` the loader adds to every
    message) are left out.

    >>> trl_reward_inputs([[{"role": "user", "content": "2+2?"}]], ["4"], [True])
    (['2+2?'], ['4'])
    >>> trl_reward_inputs([[{"role": "user", "content": "2+2?", "reasoning_content": None}]], ["4"], [False])
    ([[{'role': 'user', 'content': '2+2?'}]], [[{'role': 'assistant', 'content': '4'}]])
    """
    if not len(prompts) == len(texts) == len(text_prompt):
        raise ValueError(f"{len(prompts)} prompts, {len(texts)} completions and {len(text_prompt)} format flags")
    if all(flag or isinstance(p, str) for p, flag in zip(prompts, text_prompt)):
        return [last_user_text(p) for p in prompts], list(texts)
    as_messages = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    return ([[{k: v for k, v in m.items() if v is not None} for m in p] for p in as_messages],
            [[{"role": "assistant", "content": t}] for t in texts])  # fmt: skip


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a built-in reward to the registry under ``name``; a second use of a name is an error.

    Refusing duplicates keeps a config's ``"math_accuracy"`` meaning one function, whatever import order did.
    """

    def decorate(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward name {name!r} is already registered to {_REGISTRY[name]!r}; pick another name")
        _REGISTRY[name] = fn
        return fn

    return decorate


def list_rewards() -> list[str]:
    """Names of the built-in rewards, sorted."""
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
    """The built-in registered as ``name``; the error lists what is available."""
    if name not in _REGISTRY:
        raise KeyError(f"no built-in reward named {name!r}; built-ins are {list_rewards()}")
    return _REGISTRY[name]


def reward_name(fn: RewardFn) -> str:
    """A readable name for logging: the registry name, else ``__name__`` (also for partials and callable objects)."""
    for name, registered in _REGISTRY.items():
        if registered is fn:
            return name
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


def load_reward(spec: str | RewardFn, **params: Any) -> RewardFn:
    """Turn a reward spec into a callable, binding ``params`` as keyword arguments.

    ``spec`` is one of: a callable; a built-in name (``"math_accuracy"``); a dotted path ``"pkg.module:fn"`` (or
    ``"pkg.module.fn"``); a file path ``"path/to/file.py:fn"``. Params are checked against the signature so a typo
    fails at load time rather than mid-training, and so does a function that cannot be called as a reward
    (:func:`_check_signature`): otherwise it would fail on every sample and a whole stage would train on nothing.

    >>> load_reward("think_format").__name__
    'think_format'
    >>> load_reward("dsalign.rewards.length:soft_overlong", max_length=100, cache_length=20).keywords
    {'max_length': 100, 'cache_length': 20}
    """
    fn = spec if callable(spec) else _resolve(spec)
    if not callable(fn):
        raise RewardLoadError(f"reward {spec!r} resolved to {fn!r}, which is not callable")
    verl = is_verl_score(fn)
    call = VERL_CALL if verl else TRL_CALL
    _check_params(fn, params, spec, call)
    _check_signature(fn, set(params), spec, call, columns=not verl)
    bound = fn
    if params:
        bound = functools.partial(fn, **params)
        functools.update_wrapper(bound, fn)  # keeps __name__ for logging
    return from_verl(bound) if verl else bound


def unfilled_parameters(reward: RewardFn, columns: Collection[str]) -> list[str]:
    """Required parameters of a reward as ``load_reward`` returned it (params bound) that neither the call nor the
    data's ``columns`` fill, so that it would raise on every sample. ``load_reward`` lets such parameters pass (they
    are most likely dataset columns, unknown until data arrives); a caller that knows the columns, like the
    pipeline's preflight, asks here. verl-style functions come back wrapped in a TRL-style call: nothing to check."""
    fn, bound = (reward.func, reward.keywords) if isinstance(reward, functools.partial) else (reward, {})
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return _unfilled(signature, {*TRL_CALL, *bound, *columns})


def _unfilled(signature: inspect.Signature, filled: Collection[str]) -> list[str]:
    """The required parameters a keyword call can fill that none of ``filled`` names."""
    return [p.name for p in signature.parameters.values() if p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in filled]  # fmt: skip


VERL_PARAMS = ("solution_str", "ground_truth")
# The keyword arguments every call passes: the combiner's (TRL's) and from_verl's.
TRL_CALL = ("prompts", "completions", "completion_ids")
VERL_CALL = ("data_source", "solution_str", "ground_truth", "extra_info")


def is_verl_score(fn: RewardFn) -> bool:
    """Whether ``fn`` has verl's signature, ``compute_score(data_source, solution_str, ground_truth, extra_info)``,
    rather than TRL's (it names ``solution_str`` and ``ground_truth`` and no ``completions``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(p in params for p in VERL_PARAMS) and "completions" not in params


def from_verl(fn: RewardFn) -> RewardFn:
    """A verl ``compute_score`` as a TRL-style reward: called once per sample with ``data_source`` (the sample's
    column, else ``""``), ``solution_str`` (the completion's text), ``ground_truth`` (the ``ground_truth`` column,
    else verl's ``reward_model["ground_truth"]``, else ``answer``) and ``extra_info`` (the column, else None). A
    float is the reward; a dict gives its ``"score"`` (verl's convention; other keys are verl's extra metrics and
    are dropped)."""
    name = reward_name(fn)

    def reward(prompts, completions, completion_ids=None, **columns):
        n = len(completions)

        def column(key: str) -> list[Any] | None:
            values = columns.get(key)
            return list(values) if values is not None else None

        truth = column("ground_truth")
        if truth is None and column("reward_model") is not None:
            truth = [r.get("ground_truth") if isinstance(r, dict) else None for r in column("reward_model")]
        truth = truth if truth is not None else column("answer")
        if truth is None:
            have = sorted(columns) or "no columns"
            raise ValueError(f"{name} (verl compute_score) needs a ground truth per sample: a 'ground_truth', "
                             f"'reward_model' or 'answer' column; the data has {have}")  # fmt: skip
        sources, extra = column("data_source") or [""] * n, column("extra_info") or [None] * n
        scores = []
        for i, completion in enumerate(completions):
            out = fn(data_source=sources[i], solution_str=completion_text(completion), ground_truth=truth[i],
                     extra_info=extra[i])  # fmt: skip
            if isinstance(out, dict):
                if "score" not in out:
                    raise ValueError(f"{name} returned a dict without 'score' (keys {sorted(out)}) for sample {i}")
                out = out["score"]
            scores.append(None if out is None else float(out))
        return scores

    reward.__name__ = name
    return reward


def _resolve(spec: str) -> Any:
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        where, _, attr = spec.rpartition(":")
        if where.endswith(".py") or os.sep in where or "/" in where:
            module = _import_file(where, spec)
        else:
            module = _import_module(where, spec)
    elif "." in spec:
        where, _, attr = spec.rpartition(".")
        module = _import_module(where, spec)
    else:
        raise RewardLoadError(
            f"reward {spec!r} is not a built-in ({list_rewards()}) nor a 'pkg.module:fn' or 'file.py:fn' path"
        )
    if not hasattr(module, attr):
        raise RewardLoadError(f"reward {spec!r}: module {module.__name__!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _import_module(dotted: str, spec: str) -> Any:
    try:
        return importlib.import_module(dotted)
    except Exception as e:  # an ImportError or anything the module raised while importing
        raise RewardLoadError(f"reward {spec!r}: importing module {dotted!r} failed: {type(e).__name__}: {e}") from e


def _import_file(path: str, spec: str) -> Any:
    if not os.path.isfile(path):
        raise RewardLoadError(f"reward {spec!r}: file {path!r} does not exist (cwd is {os.getcwd()!r})")
    module_name = "dsalign_user_reward_" + os.path.splitext(os.path.basename(path))[0]
    file_spec = importlib.util.spec_from_file_location(module_name, path)
    if file_spec is None or file_spec.loader is None:
        raise RewardLoadError(f"reward {spec!r}: {path!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        file_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise RewardLoadError(f"reward {spec!r}: executing {path!r} failed: {type(e).__name__}: {e}") from e
    return module


def _check_params(fn: RewardFn, params: dict[str, Any], spec: Any, call: tuple[str, ...] = TRL_CALL) -> None:
    """Every ``params`` key must be a named parameter the call can fill by keyword and not one the call passes.

    Only named parameters count: a typo must not slip into ``**columns``, where it would be silently ignored; a
    bound ``prompts``/``completions``/``completion_ids`` (those in ``call``) would be silently overridden.
    """
    reserved = sorted(set(params) & set(call))
    if reserved:
        raise RewardSignatureError(
            f"reward {spec!r}: params {reserved} cannot be bound; the trainer passes them on every call"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call report it
    accepted = [name for name, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise RewardSignatureError(f"reward {spec!r} has no parameter(s) {unknown}; it accepts {accepted}")


def _check_signature(fn: RewardFn, bound: set[str], spec: Any, call: tuple[str, ...], columns: bool) -> None:
    """Refuse a function that the combiner's call ``fn(prompts=..., completions=..., completion_ids=..., **columns)``
    (``call`` names the keywords; verl's is ``fn(data_source=..., solution_str=..., ground_truth=...,
    extra_info=...)``) would fail on every sample.

    Calls pass keywords only, so each name in ``call`` must be a parameter that takes a keyword or be absorbed by
    ``**kwargs`` (``*args`` absorbs nothing), and a required positional-only parameter can never be filled. A
    required parameter outside ``call`` and not ``bound`` by params is accepted when ``columns`` are passed: it is
    most likely a dataset column (``math_accuracy``'s ``answer``, TRL's ``solution``), and columns are only known
    once data arrives. Callables without a retrievable signature (some builtins) are accepted.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    parameters = signature.parameters.values()
    keyword = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    required = [p.name for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    shown = f"fn({', '.join(f'{name}=...' for name in call)}{', **columns' if columns else ''})"
    missing = [name for name in call if name not in keyword and not takes_any]
    positional = [p.name for p in parameters if p.kind is p.POSITIONAL_ONLY and p.name in required]
    unfilled = [] if columns else _unfilled(signature, {*call, *bound})
    problems = [
        f"it cannot take {missing} by keyword (no such parameters, no **kwargs)" if missing else "",
        f"its required parameter(s) {positional} are positional-only" if positional else "",
        f"nothing fills its required parameter(s) {unfilled}" if unfilled else "",
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        raise RewardSignatureError(
            f"reward {spec!r} with signature {signature} cannot be called as {shown}: {'; '.join(problems)}; "
            f"name those parameters, add **kwargs, or bind extra ones with params"
        )
