"""Call every reward on a batch, survive the broken ones, and combine the results with per-reward weights.

Combination follows TRL's ``GRPOTrainer``: ``None`` becomes NaN and the weighted sum is a *nansum*, i.e. a
component that is ``None`` for a sample is left out of that sample's sum (it counts as neither 0 nor a vote); a
sample for which *every* component is ``None`` is unscorable and its combined reward is ``None`` (TRL marks it NaN
and gives it zero advantage). Weights are not renormalised over the components present.

Failures (an exception, a timeout, a wrong-length or non-numeric return, an infinite value) are contained per
reward: the affected samples get ``error_value`` (``None`` by default, so they drop out of the sum; ``0.0`` to
penalise), each failure is recorded with the offending sample and logged, and ``strict=True`` raises
:class:`RewardError` with the same text.
When a reward raises on the whole batch it is retried sample by sample so that only the offending samples lose
their value (group rewards that need the whole batch, marked ``requires_full_batch``, are not retried).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
import numbers
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .api import RewardFn, load_reward, reward_name

logger = logging.getLogger("dsalign.rewards")

_MISSING = object()


class RewardError(RuntimeError):
    """A reward failed under ``strict=True``; the message names the reward, the failure and the sample."""


@dataclass(frozen=True)
class RewardSpec:
    """One reward in a combination. ``fn`` may be a callable or any spec :func:`load_reward` accepts."""

    fn: RewardFn | str
    weight: float = 1.0
    name: str | None = None
    timeout_s: float | None = 60.0
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse a weight that is not a finite number: one NaN or inf weight turns every combined reward, and so
        every advantage, into NaN (inf * 0 is NaN too)."""
        if isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real) or not math.isfinite(self.weight):
            raise ValueError(f"RewardSpec({self.fn!r}): weight must be a finite number, got {self.weight!r}")


@dataclass(frozen=True)
class RewardFailure:
    """One contained failure: which reward, what kind, which sample (``None`` = the whole batch), and why."""

    reward: str
    kind: str  # "exception" | "timeout" | "length" | "value"
    message: str
    sample_index: int | None = None
    sample: str = ""

    def __str__(self) -> str:
        where = "the whole batch" if self.sample_index is None else f"sample {self.sample_index}"
        shown = f"; sample: {self.sample}" if self.sample else ""
        return f"reward {self.reward!r} failed ({self.kind}) on {where}: {self.message}{shown}"


@dataclass
class CombinedRewards:
    """``rewards[i]`` is sample i's weighted sum; ``components[name][i]`` each reward's raw (unweighted) value."""

    rewards: list[float | None]
    components: dict[str, list[float | None]]
    failures: list[RewardFailure]
    metrics: dict[str, float]


class RewardCombiner:
    """Holds a list of rewards with weights and a failure policy; call it like a reward function.

    >>> combiner = RewardCombiner([RewardSpec("think_format", weight=0.5), "markdown_style"])
    >>> out = combiner(["q", "q"], ["<think>hm</think>4", "**4**"])
    >>> out.rewards, out.components["think_format"]
    ([1.5, 0.0], [1.0, 0.0])
    """

    def __init__(
        self,
        rewards: Sequence[RewardSpec | RewardFn | str],
        *,
        strict: bool = False,
        error_value: float | None = None,
        default_timeout_s: float | None = 60.0,
    ) -> None:
        if not rewards:
            raise ValueError("RewardCombiner needs at least one reward")
        if error_value is not None and not math.isfinite(error_value):
            raise ValueError(f"error_value must be None or a finite number, got {error_value!r}")
        specs = [r if isinstance(r, RewardSpec) else RewardSpec(r, timeout_s=default_timeout_s) for r in rewards]
        fns = [load_reward(spec.fn, **spec.params) for spec in specs]
        self.fns: dict[str, RewardFn] = {}
        self.weights: dict[str, float] = {}
        self.timeouts: dict[str, float | None] = {}
        for spec, fn, name in zip(specs, fns, _reward_names(specs, fns), strict=True):
            self.fns[name], self.weights[name], self.timeouts[name] = fn, float(spec.weight), spec.timeout_s
        self.strict = strict
        self.error_value = error_value

    def __call__(
        self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None, **columns: Any
    ) -> CombinedRewards:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts but {n} completions; pass one prompt per completion")
        for key, column in columns.items():
            if isinstance(column, (list, tuple)) and len(column) != n:
                raise ValueError(f"column {key!r} has {len(column)} values for {n} completions")
        batch = (list(prompts), list(completions), completion_ids, columns)
        threads = {name: _Call(fn, batch, self.timeouts[name]) for name, fn in self.fns.items()}
        components: dict[str, list[float | None]] = {}
        component_weight: dict[str, float] = {}
        failures: list[RewardFailure] = []
        for name, call in threads.items():
            values, failed = self._collect(name, call, batch)
            failures += failed
            for key, column in values.items():
                components[key], component_weight[key] = column, self.weights[name]
        if failures:
            report = "\n".join(str(f) for f in failures)
            if self.strict:
                raise RewardError(report)
            for failure in failures:
                logger.warning("%s", failure)
        rewards = [_weighted_nansum([(components[k][i], w) for k, w in component_weight.items()]) for i in range(n)]
        return CombinedRewards(rewards, components, failures, _metrics(rewards, components, failures, self.fns))

    def _collect(
        self, name: str, call: _Call, batch: tuple
    ) -> tuple[dict[str, list[float | None]], list[RewardFailure]]:
        """One reward's columns (``name`` or ``name/key`` for dict returns), with failures replaced by the policy."""
        n = len(batch[1])
        out = call.result()
        if out is _TIMEOUT:
            failure = RewardFailure(name, "timeout", f"no result after {self.timeouts[name]}s", None, _show(batch, 0))
            return {name: [self.error_value] * n}, [failure]
        if isinstance(out, BaseException):
            if getattr(_unwrap(self.fns[name]), "requires_full_batch", False) or n == 1:
                failure = RewardFailure(name, "exception", _describe(out), None if n > 1 else 0, _show(batch, 0))
                return {name: [self.error_value] * n}, [failure]
            return self._per_sample(name, batch, call, out)
        try:
            values = _validate(name, out, n)
        except ValueError as e:
            return {name: [self.error_value] * n}, [RewardFailure(name, _kind(e), str(e), None, _show(batch, 0))]
        return self._drop_infinite(name, values, batch, 0)

    def _per_sample(
        self, name: str, batch: tuple, call: _Call, batch_error: BaseException
    ) -> tuple[dict[str, list[float | None]], list[RewardFailure]]:
        """Re-run a reward that raised on the batch one sample at a time, to find and blame only the bad samples.

        The retry spends what is left of the reward's one time budget (counted from the batch call's start); the
        samples it cannot reach in time are timeout failures, not new threads. A failed sample gets
        ``error_value`` once, in the ``name`` column (a dict reward's own columns are ``None`` there), exactly as
        a failed batch does; so a dict reward with three keys is not penalised three times. When every sample
        succeeds alone, the batch's exception is still reported (values kept): something in the batch call broke.
        """
        n = len(batch[1])
        columns_out: dict[str, list[float | None]] = {}
        failed = [False] * n
        failures: list[RewardFailure] = []
        for i in range(n):
            remaining = call.remaining()
            if remaining is not None and remaining <= 0:
                message = f"not scored: the {self.timeouts[name]}s budget ran out during the per-sample retry"
                failures.append(RewardFailure(name, "timeout", message, i, _show(batch, i)))
                failed[i] = True
                continue
            out = _Call(self.fns[name], _row(batch, i), remaining).result()
            try:
                if out is _TIMEOUT:
                    raise TimeoutError(f"no result within the {self.timeouts[name]}s budget (per-sample retry)")
                if isinstance(out, BaseException):
                    raise out
                values = _validate(name, out, 1)
            except BaseException as e:  # noqa: BLE001 - every failure becomes a report, never a crash
                kind = "timeout" if isinstance(e, TimeoutError) else _kind(e) if isinstance(e, ValueError) else None
                failures.append(RewardFailure(name, kind or "exception", _describe(e), i, _show(batch, i)))
                failed[i] = True
                continue
            values, infinite = self._drop_infinite(name, values, batch, i)
            failures += infinite
            for key, column in values.items():
                columns_out.setdefault(key, [None] * n)[i] = column[0]
        if not columns_out or (any(failed) and self.error_value is not None):
            column = columns_out.setdefault(name, [None] * n)
            for i in (i for i, bad in enumerate(failed) if bad):
                column[i] = self.error_value
        if not any(f.kind == "exception" for f in failures):
            message = f"{_describe(batch_error)}; raised on the whole batch, yet no sample raised alone (values kept)"
            failures.append(RewardFailure(name, "exception", message, None, _show(batch, 0)))
        return columns_out, failures

    def _drop_infinite(
        self, name: str, values: dict[str, list[float | None]], batch: tuple, first: int
    ) -> tuple[dict[str, list[float | None]], list[RewardFailure]]:
        """Replace +-inf (at batch index ``first + j``) by ``error_value``, with one "value" failure per sample.

        Unlike NaN, which TRL uses for "not applicable" and we read as ``None``, an infinite reward means nothing
        (an overflow, a division by zero) and, left in, makes its group's mean and std and every advantage NaN."""
        failures = []
        for key, column in values.items():
            for j, value in enumerate(column):
                if value is not None and math.isinf(value):
                    message = f"value: {key} returned {value} at index {first + j}, expected a finite float | None"
                    failures.append(RewardFailure(name, "value", message, first + j, _show(batch, first + j)))
                    column[j] = self.error_value
        return values, failures


def _reward_names(specs: Sequence[RewardSpec], fns: Sequence[RewardFn]) -> list[str]:
    """Each reward's name for components and metrics (``reward/<name>``): ``RewardSpec.name`` when given, else the
    function's name, numbered ``_2``, ``_3``, ... in order for the second and later unnamed rewards of one function
    (``math_accuracy``, ``math_accuracy_2``) so a config may use a function twice. Numbering skips names taken
    explicitly; two explicit equal names are refused, as the user asked for both and only one can have it."""
    explicit = [spec.name for spec in specs if spec.name]
    for name in explicit:
        if explicit.count(name) > 1:
            raise ValueError(f"two rewards are named {name!r}; give one a distinct RewardSpec(name=...)")
    taken, names = set(explicit), []
    for spec, fn in zip(specs, fns, strict=True):
        name = spec.name or _free_name(reward_name(fn), taken)
        taken.add(name)
        names.append(name)
    return names


def _free_name(base: str, taken: set[str]) -> str:
    """``base`` if not taken, else the first free ``base_2``, ``base_3``, ...

    >>> _free_name("math_accuracy", {"math_accuracy", "math_accuracy_2"})
    'math_accuracy_3'
    """
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


_TIMEOUT = object()


class _Call:
    """A reward call on a daemon thread: Python cannot kill a thread, so a hung reward is abandoned, not stopped
    (its thread lingers until it returns; sandboxed rewards are killed by the sandbox's own wall clock)."""

    def __init__(self, fn: RewardFn, batch: tuple, timeout_s: float | None) -> None:
        self.fn, self.batch = fn, batch
        # the budget counts from the start, not from when someone waits: rewards collected after a slow one must
        # not get its time on top of their own
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.value: Any = _MISSING
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"reward-{reward_name(fn)}")
        self.thread.start()

    def _run(self) -> None:
        prompts, completions, completion_ids, columns = self.batch
        try:
            kwargs = _accepted_kwargs(self.fn, columns)
            out = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            self.value = asyncio.run(out) if inspect.isawaitable(out) else out
        except BaseException as e:  # noqa: BLE001 - handed to the combiner, which reports it
            e.__traceback_text__ = traceback.format_exc()  # type: ignore[attr-defined]
            self.value = e

    def remaining(self) -> float | None:
        """Seconds left of the budget (``None``: no limit)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def result(self) -> Any:
        self.thread.join(self.remaining())
        return _TIMEOUT if self.thread.is_alive() else self.value


def _accepted_kwargs(fn: RewardFn, columns: dict[str, Any]) -> dict[str, Any]:
    """All columns for ``**kwargs`` functions (TRL's contract); only the named ones for functions without it."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return columns
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return columns
    return {k: v for k, v in columns.items() if k in params}


def _validate(name: str, out: Any, n: int) -> dict[str, list[float | None]]:
    """Check a reward's return: ``n`` numbers-or-None (a list, tuple or 1-D numpy array / tensor), or a dict of
    such. NaN is read as ``None`` (TRL);
    +-inf is kept for :meth:`RewardCombiner._drop_infinite`, which fails only the samples that have it."""
    columns = {f"{name}/{k}": v for k, v in out.items()} if isinstance(out, dict) else {name: out}
    checked = {}
    for key, values in columns.items():
        if getattr(values, "ndim", None) == 1 and hasattr(values, "tolist"):  # a numpy array or torch tensor
            values = values.tolist()
        if not isinstance(values, (list, tuple)):
            shape = f" of shape {tuple(values.shape)}" if hasattr(values, "shape") else ""
            raise ValueError(f"value: {key} returned {type(values).__name__}{shape}, expected a list (or 1-D array) "
                             "of float | None")  # fmt: skip
        if len(values) != n:
            raise ValueError(f"length: {key} returned {len(values)} rewards for {n} completions (need one each)")
        checked[key] = [_as_float(key, v, i) for i, v in enumerate(values)]
    return checked


def _as_float(key: str, value: Any, index: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)):  # float("1.0") would pass: a reward that returns text has a bug
        raise ValueError(f"value: {key} returned {value!r} at index {index}, expected float | None, not text")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"value: {key} returned {value!r} at index {index}, expected float | None") from None
    return None if math.isnan(number) else number


def _weighted_nansum(pairs: list[tuple[float | None, float]]) -> float | None:
    """TRL's combination: sum of weight * value over the components present; ``None`` if none is present.

    >>> _weighted_nansum([(1.0, 2.0), (None, 5.0)]), _weighted_nansum([(None, 1.0)])
    (2.0, None)
    """
    present = [v * w for v, w in pairs if v is not None]
    return sum(present) if present else None


def _metrics(
    rewards: list[float | None],
    components: dict[str, list[float | None]],
    failures: list[RewardFailure],
    fns: dict[str, RewardFn] | Sequence[str],
) -> dict[str, float]:
    """Scalars for the logger: mean/std of the combined reward and of each component, None share, error counts."""
    metrics: dict[str, float] = {}
    for key, values in {"reward": rewards, **{f"rewards/{k}": v for k, v in components.items()}}.items():
        present = [v for v in values if v is not None]
        mean = sum(present) / len(present) if present else math.nan
        metrics[f"{key}/mean"] = mean
        metrics[f"{key}/std"] = math.sqrt(sum((v - mean) ** 2 for v in present) / len(present)) if present else math.nan
        metrics[f"{key}/none_frac"] = 1 - len(present) / len(values) if values else 0.0
    for name in fns:
        metrics[f"errors/{name}"] = float(sum(f.reward == name for f in failures))
    metrics["errors/total"] = float(len(failures))
    return metrics


def concat_results(parts: Sequence[CombinedRewards], reward_names: Sequence[str]) -> CombinedRewards:
    """One result from the results of scoring consecutive slices of one batch (e.g. on several worker processes).

    Rewards and components are concatenated in order; a component that a slice lacks (a dict-returning reward that
    failed on that slice) is ``None`` on its samples. Failures keep their sample, with the index shifted to the whole
    batch; metrics are recomputed over the whole batch. When no reward fails, the result equals scoring the whole
    batch at once, for group rewards too as long as every group lies within one slice.

    >>> combiner = RewardCombiner(["think_format"])
    >>> parts = [combiner(["q"], ["<think>a</think>1"]), combiner(["q", "q"], ["no", "<think>b</think>2"])]
    >>> concat_results(parts, ["think_format"]).rewards
    [1.0, 0.0, 1.0]
    """
    rewards: list[float | None] = []
    components: dict[str, list[float | None]] = {}
    failures: list[RewardFailure] = []
    for part in parts:
        start, n = len(rewards), len(part.rewards)
        for key in [*components, *(k for k in part.components if k not in components)]:
            components.setdefault(key, [None] * start).extend(part.components.get(key, [None] * n))
        rewards += part.rewards
        for f in part.failures:
            shifted = None if f.sample_index is None else f.sample_index + start
            failures.append(dataclasses.replace(f, sample_index=shifted))
    return CombinedRewards(rewards, components, failures, _metrics(rewards, components, failures, reward_names))


def _row(batch: tuple, i: int) -> tuple:
    prompts, completions, completion_ids, columns = batch
    ids = None if completion_ids is None else [completion_ids[i]]
    cols = {k: [v[i]] if isinstance(v, (list, tuple)) else v for k, v in columns.items()}
    return [prompts[i]], [completions[i]], ids, cols


def _show(batch: tuple, i: int, limit: int = 200) -> str:
    """The offending sample, shortened, for the error report."""
    prompt, completion = repr(batch[0][i]), repr(batch[1][i])
    cut = lambda s: s if len(s) <= limit else s[:limit] + f"...(+{len(s) - limit} chars)"  # noqa: E731
    return f"prompt={cut(prompt)} completion={cut(completion)}"


def _describe(e: BaseException) -> str:
    text = getattr(e, "__traceback_text__", "")
    last_frame = text.strip().splitlines()[-3].strip() if text.count("\n") >= 3 else ""
    return f"{type(e).__name__}: {e}" + (f" (at {last_frame})" if last_frame else "")


def _kind(e: ValueError) -> str:
    text = str(e)
    return "length" if text.startswith("length:") else "value" if text.startswith("value:") else "exception"


def _unwrap(fn: Callable) -> Callable:
    while hasattr(fn, "func"):
        fn = fn.func  # functools.partial
    return fn


def combine_rewards(
    rewards: Sequence[RewardSpec | RewardFn | str],
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    strict: bool = False,
    error_value: float | None = None,
    **columns: Any,
) -> CombinedRewards:
    """One-shot form of :class:`RewardCombiner` (which loads rewards once; prefer it in a training loop)."""
    combiner = RewardCombiner(rewards, strict=strict, error_value=error_value)
    return combiner(prompts, completions, completion_ids, **columns)
