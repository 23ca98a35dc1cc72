"""The reward-function contract, the registry of built-ins, and loading user rewards by name or path.

A reward is any callable with TRL's signature::

    fn(prompts, completions, completion_ids=None, **columns) -> list[float | None] | dict[str, list[float | None]]

``columns`` carries every other dataset column (``answer``, ``tests``, ...), one value per sample. ``None`` means
"not applicable to this sample" and is excluded from the weighted sum (see ``combine.py``). ``async def`` rewards are
allowed. Keeping TRL's signature means every reward written for ``trl.GRPOTrainer`` works here unchanged.

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
from collections.abc import Callable
from typing import Any

RewardFn = Callable[..., Any]

_REGISTRY: dict[str, RewardFn] = {}


class RewardLoadError(ImportError):
    """A reward spec could not be turned into a callable; the message names the spec and what failed."""


def completion_text(completion: Any) -> str:
    """Text of one completion (or prompt), whether a plain string or a TRL conversational message list.

    For a message list, TRL's completion is the assistant turn(s) it generated; we join the ``content`` of every
    message, which for the usual single-message completion is just that message.

    >>> completion_text("plain")
    'plain'
    >>> completion_text([{"role": "assistant", "content": "hi"}])
    'hi'
    >>> completion_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}])
    'Be brief.\\n2+2?'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return "\n".join(completion_text(message) for message in completion)
    raise TypeError(f"expected a string or a list of {{'role', 'content'}} messages, got {type(completion).__name__}")


def last_user_text(prompt: Any) -> str:
    """The user's words in a prompt: the last ``user`` message of a conversation, or the string itself.

    >>> last_user_text([{"role": "system", "content": "sys"}, {"role": "user", "content": "Bonjour"}])
    'Bonjour'
    """
    if isinstance(prompt, (list, tuple)):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return completion_text(users[-1]) if users else completion_text(prompt)
    return completion_text(prompt)


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
    fails at load time rather than mid-training.

    >>> load_reward("think_format").__name__
    'think_format'
    >>> load_reward("dsalign.rewards.length:soft_overlong", max_length=100, cache_length=20).keywords
    {'max_length': 100, 'cache_length': 20}
    """
    fn = spec if callable(spec) else _resolve(spec)
    if not callable(fn):
        raise RewardLoadError(f"reward {spec!r} resolved to {fn!r}, which is not callable")
    if not params:
        return fn
    _check_params(fn, params, spec)
    bound = functools.partial(fn, **params)
    functools.update_wrapper(bound, fn)  # keeps __name__ for logging
    return bound


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


def _check_params(fn: RewardFn, params: dict[str, Any], spec: Any) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call report it
    # Only named parameters count: a typo must not slip into **columns, where it would be silently ignored.
    accepted = [name for name, p in signature.parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise RewardLoadError(f"reward {spec!r} has no parameter(s) {unknown}; it accepts {accepted}")
