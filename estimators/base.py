"""The estimator contract, its registry and the one autograd Function the simple ones share.

An *estimator* is an ``nn.Module`` that quantizes one tensor role (``"weight"`` or
``"activation"``) at one bit width. In ``train()`` mode it returns what the training forward
pass uses and defines the gradient that flows back; in ``eval()`` mode it returns the hard
quantizer's output, ``scale(x)·level`` with every level in ``level_set()``.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .registry import Registry, UnknownNameError

ESTIMATORS: Registry = Registry("estimator")
ROLES = ("weight", "activation")
#: Bit widths an estimator quantizes to. 32 ("float") is handled by the layers: no estimator.
SUPPORTED_BITS = tuple(range(1, 9))
FLOAT_BITS = 32


@dataclass(frozen=True)
class Param:
    """One user-settable estimator parameter: default, meaning and allowed values."""

    default: Any
    doc: str
    choices: tuple | None = None
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    validate: Callable[[Any], Any] | None = None  # other values: returns the checked value or raises ValueError

    def check(self, estimator: str, name: str, value: Any) -> Any:
        if self.choices is not None:
            if value not in self.choices:
                raise UnknownNameError(
                    f"{estimator}: {name}={value!r} is not allowed; choose one of {', '.join(map(str, self.choices))}"
                )
            return value
        if isinstance(self.default, (int, float)) and not isinstance(self.default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{estimator}: {name} must be a number, got {value!r}")
            if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                raise ValueError(f"{estimator}: {name}={value} is outside [{self.low}, {self.high}]")
            return float(value) if isinstance(self.default, float) else value
        if isinstance(self.default, bool) and not isinstance(value, bool):
            raise ValueError(f"{estimator}: {name} must be true or false, got {value!r}")
        if self.validate is not None and value is not None:
            try:
                return self.validate(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{estimator}: {name}={value!r} is not allowed: {e}") from None
        return value

    def allowed(self) -> str:
        """What :meth:`check` accepts, in words: the choices, the inclusive range ``[low, high]`` (``≥ low`` or
        ``≤ high`` with one bound), true or false, or the first line of ``validate``'s docstring (or null)."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if isinstance(self.default, bool):
            return "true or false"
        if isinstance(self.default, (int, float)):
            low, high = (None if b is None else f"{b:.12g}" for b in (self.low, self.high))
            if low is not None and high is not None:
                return f"[{low}, {high}]"
            return f"≥ {low}" if low is not None else f"≤ {high}" if high is not None else "any number"
        if self.validate is not None:  # None passes unchecked (see check)
            rule = (inspect.getdoc(self.validate) or "checked").splitlines()[0].rstrip(".")
            return f"{rule[:1].lower()}{rule[1:]}, or null"
        return "any"


class QuantizeWithSurrogate(torch.autograd.Function):
    """y = forward_fn(x); ∂L/∂x = grad_fn(k, ∂L/∂y) with k = ``kept`` if given, else x; or ∂L/∂y when grad_fn
    is None, or c·∂L/∂y when it is a number c (then nothing is kept for the backward).

    The pattern every sign-like estimator shares: a hard (or mixed) forward and a hand-written
    pseudo-gradient. ``grad_fn`` must modify neither argument in place.
    """

    @staticmethod
    def forward(ctx, x, forward_fn, grad_fn, kept=None):
        ctx.grad_fn = grad_fn
        if callable(grad_fn):
            ctx.save_for_backward(x if kept is None else kept)
        return forward_fn(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.grad_fn is None:
            return g, None, None, None
        if not callable(ctx.grad_fn):
            return g * ctx.grad_fn, None, None, None
        (k,) = ctx.saved_tensors
        return ctx.grad_fn(k, g), None, None, None


def surrogate(x: torch.Tensor, forward_fn: Callable, grad_fn: Callable | float | None,
              kept: torch.Tensor | None = None) -> torch.Tensor:
    """Apply :class:`QuantizeWithSurrogate`."""
    return QuantizeWithSurrogate.apply(x, forward_fn, grad_fn, kept)


class Estimator(nn.Module):
    """Base class. Subclasses set ``name``, ``params``, ``paper`` and a docstring with the formula.

    Class attributes:
      params        user parameters (``Param``), checked by :func:`create_estimator`
      clip_weights  (low, high) range latent weights are clipped to after each step, or None
      scheduled     True when :meth:`set_progress` changes the estimator's behaviour
      soft_forward  True when :meth:`train_forward`'s output differs from :meth:`hard`'s (a soft or mixed
                    forward, e.g. AQE's α·Q(x) + (1 − α)·x): the trainer then also measures the
                    validation accuracy of the training forward (``val_acc_soft``)
      grids         the quantizer grids (``estimators.grids``) it can quantize to, its own first;
                    with more than one, a ``grid`` parameter chooses
      cuda_graphs   True when its training forward and backward on CUDA make no host sync and take no
                    branch on a tensor's value, so a CUDA graph can capture them (``workers.cuda_graphs``)

    Instance attribute ``frozen_stats``: when True a training-mode forward updates no running statistic
    (:func:`estimators.training_forward` measures the training forward with it set).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    clip_weights: ClassVar[tuple[float, float] | None] = (-1.0, 1.0)
    scheduled: ClassVar[bool] = False
    soft_forward: ClassVar[bool] = False
    grids: ClassVar[tuple[str, ...]] = ()
    cuda_graphs: ClassVar[bool] = False

    def __init__(self, bits: int = 1, role: str = "weight", **params: Any):
        super().__init__()
        if role not in ROLES:
            raise UnknownNameError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
        if bits not in SUPPORTED_BITS:
            raise ValueError(
                f"estimator {self.name!r} does not support {bits} bits; supported: "
                f"{SUPPORTED_BITS[0]}–{SUPPORTED_BITS[-1]} ({FLOAT_BITS} = float, which needs no estimator)"
            )
        self.bits, self.role = bits, role
        self.hparams = self.check_params(params)
        self.epoch, self.total_epochs = 0, 1
        self.frozen_stats = False

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Validate user parameters; return the full set with defaults filled in."""
        unknown = set(params) - set(cls.params)
        if unknown:
            known = ", ".join(sorted(cls.params)) or "none"
            raise UnknownNameError(
                f"estimator {cls.name!r} has no parameter {', '.join(map(repr, sorted(unknown)))}; known: {known}"
            )
        return {k: p.check(cls.name, k, params.get(k, p.default)) for k, p in cls.params.items()}

    @classmethod
    def grid_for(cls, params: dict[str, Any]) -> str:
        """The grid an instance built with ``params`` quantizes to: their ``grid``, else the estimator's own."""
        return params.get("grid") or cls.grids[0]

    @property
    def grid(self) -> str:
        """The quantizer grid this instance quantizes to (``estimators.grids``)."""
        return self.grid_for(self.hparams)

    # -- schedule -------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        """Training progress e/E in [0, 1], as last given to :meth:`set_progress`."""
        return min(max(self.epoch / max(self.total_epochs, 1), 0.0), 1.0)

    def set_progress(self, epoch: int, total_epochs: int) -> None:
        """Called once per epoch by the trainer, epoch = 1 … total_epochs (0 before training)."""
        self.epoch, self.total_epochs = int(epoch), int(total_epochs)

    def schedule_values(self) -> dict[str, float]:
        """Current values of scheduled or learned quantities, for logging (e.g. {"alpha": 0.7})."""
        return {}

    # -- quantization ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.train_forward(x) if self.training else self.hard(x)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hard(self, x: torch.Tensor) -> torch.Tensor:
        """The hard quantizer used in eval mode: ``scale(x) · level``."""
        raise NotImplementedError

    def level_set(self) -> torch.Tensor:
        """The exact unscaled levels of :meth:`hard`'s output (float64, sorted)."""
        raise NotImplementedError

    def scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The scale multiplying the levels in :meth:`hard` (broadcastable to x), or None for 1."""
        return None

    def packed_encoding(self) -> str | None:
        """The bit-packed code of :meth:`hard`'s output ("sign", "ternary", "pow2"; see
        ``workers.packed``), or None when its levels have no exact packed form (the default)."""
        return None

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"bits={self.bits}, role={self.role}" + (f", {hp}" if hp else "")


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: register an estimator under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    return ESTIMATORS.register(cls.name)(cls)


def list_estimators() -> list[str]:
    """Names of all registered estimators, sorted."""
    return ESTIMATORS.names()


def get_estimator_class(name: str) -> type[Estimator]:
    return ESTIMATORS.get(name)


def create_estimator(name: str, bits: int = 1, role: str = "weight", **params: Any) -> Estimator:
    """Build a registered estimator for one tensor role at one bit width (timm's create_model).

    Unknown names, parameters, parameter values and bit widths raise an error naming what
    was asked and listing what exists.
    """
    return get_estimator_class(name)(bits=bits, role=role, **params)


def validate_estimator_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Check a name and its parameters without building anything; return the full parameter set."""
    return get_estimator_class(name).check_params(params)


def estimator_catalog() -> list[dict[str, Any]]:
    """Every estimator with its parameters, formula (docstring) and paper, for APIs and docs."""
    out = []
    for name in list_estimators():
        cls = get_estimator_class(name)
        out.append(
            {
                "name": name,
                "paper": cls.paper,
                "formula": inspect.cleandoc(cls.__doc__ or ""),
                "scheduled": cls.scheduled,
                "clips_weights": cls.clip_weights is not None,
                "grids": list(cls.grids),
                "params": {
                    k: {"default": p.default, "doc": p.doc, "choices": list(p.choices) if p.choices else None,
                        "low": p.low, "high": p.high, "allowed": p.allowed()}
                    for k, p in cls.params.items()
                },
            }
        )
    return out


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()
