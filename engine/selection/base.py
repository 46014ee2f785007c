"""The one interface every visual-token strategy implements, and the registry that names them.

A strategy receives the vision features of the grid tiles, their geometry, the question and a
hard token budget, and returns a `Selection`: the tokens that enter the language model (already
through the projector), what each one stands for (its member patches, hence its footprint), a
score and a role. The pipeline never needs to know which strategy ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

if TYPE_CHECKING:  # imported for type hints only; keeps this module light
    import torch

ROLES = ("anchor", "kept", "merged")


class SelectionError(ValueError):
    """A strategy cannot run with the given parameters (unknown name, bad budget, ...)."""


@dataclass
class Selection:
    """Tokens chosen to enter the language model, in the order they enter it."""

    embeds: "torch.Tensor"  # (N, D_lm) after the projector
    members: list[np.ndarray]  # per token: flat patch ids (tile * 576 + patch) it stands for
    scores: np.ndarray  # (N,) float, higher = more important
    roles: list[str]  # per token, one of ROLES
    candidates: int  # tokens the unreduced path would have produced
    strategy: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # strategy-specific figures

    def __post_init__(self) -> None:
        n = int(self.embeds.shape[0])
        if len(self.members) != n or len(self.scores) != n or len(self.roles) != n:
            raise SelectionError(
                f"selection is inconsistent: {n} tokens, {len(self.members)} member lists, "
                f"{len(self.scores)} scores, {len(self.roles)} roles"
            )
        bad = set(self.roles) - set(ROLES)
        if bad:
            raise SelectionError(f"unknown roles {sorted(bad)}")

    @property
    def n_tokens(self) -> int:
        return int(self.embeds.shape[0])


class Strategy(Protocol):
    """What every strategy provides. `question_dependent` tells the server whether the image
    prefix (and its KV cache) can be reused across questions on the same raster.

    A strategy whose token count follows from the number of tiles alone may also offer
    ``planned_tokens(n_tiles, budget, n_patches) -> int | None``: that count (None when the
    features decide it) for tiles of `n_patches` patches (the model's grid squared, 576 for the
    released tower), raising the SelectionError `select` would raise. The pipeline calls it on
    the tiling plan, so a request that cannot fit the budget or the model's context is refused
    before the vision tower runs (`none`, `geollava` with faithful empty slots)."""

    name: str
    question_dependent: bool

    def select(self, features, geometry, question: str, budget: int | None, *, model) -> Selection:
        ...


_REGISTRY: dict[str, Callable[..., Strategy]] = {}


def register(name: str) -> Callable[[Callable[..., Strategy]], Callable[..., Strategy]]:
    """Class decorator: make a strategy available under `name`."""

    def wrap(factory: Callable[..., Strategy]) -> Callable[..., Strategy]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_strategy(name: str, **params: Any) -> Strategy:
    """Instantiate the strategy called `name` with its documented hyperparameters."""
    _load_builtin()
    if name not in _REGISTRY:
        raise SelectionError(
            f"unknown strategy {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name](**params)


def check_budget(budget: int | None) -> int | None:
    """Validate a token budget (None = unlimited)."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise SelectionError(f"the token budget must be a positive integer, not {budget!r}")
    return int(budget)


def _load_builtin() -> None:
    """Import the strategy modules so their @register decorators run (idempotent)."""
    import importlib
    import pkgutil

    from engine import selection as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "base":
            importlib.import_module(f"engine.selection.{mod.name}")
