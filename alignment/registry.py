"""Small name -> function registries (verl ``core_algos`` style).

Algorithms are picked by a string from the config (``advantage: grpo``, ``policy_loss: gspo``), so every
algorithm file exposes a registry. Registering the same name twice is almost always a copy-paste bug that would
silently swap the math under a run, so it is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A mapping from names to callables that refuses duplicates and names the choices on a miss."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: ``@REGISTRY.register("grpo")``. Raises ``ValueError`` if ``name`` is taken."""

        def wrap(fn: F) -> F:
            if name in self._items:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {self._items[name].__qualname__}); "
                    "pick another name"
                )
            self._items[name] = fn
            return fn

        return wrap

    def get(self, name: str) -> F:
        """Return the callable registered as ``name``; ``KeyError`` listing the known names otherwise."""
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
