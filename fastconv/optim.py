"""Optimizers with PyTorch's update rules: SGD (momentum, dampening, Nesterov, weight decay),
Adam, RMSprop and AdaGrad.

    opt = fc.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt.zero_grad(); loss_fn(model(x), labels).backward(); opt.step()

Weight decay is PyTorch's L2 form (added to the gradient). Parameters whose ``.grad`` is None
are skipped. Each runs through its ``functional`` update op (``sgd_update``, ``adam_update``,
``rmsprop_update``, ``adagrad_update``), so it works on host and device parameters alike.
Hyperparameters are plain attributes (``opt.lr = ...`` changes the learning rate).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _device, shapes
from . import functional as F
from .nn import Parameter
from .tensor import Tensor


class Optimizer:
    """Base class: the parameter list, per-parameter state and (de)serialisation."""

    _hyper: tuple[str, ...] = ("lr",)

    def __init__(self, params: Iterable[Parameter], lr: float) -> None:
        name = type(self).__name__
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{name}: got an empty parameter list")
        for i, p in enumerate(self.params):
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"{name}: params[{i}] is not a fastconv Parameter or Tensor; "
                    f"got {type(p).__name__} (pass model.parameters())"
                )
        self.lr = shapes.check_number(name, "lr", lr, lo=0.0)
        self.state: list[dict[str, Any]] = [{} for _ in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self._update(p, self.state[i])

    def _update(self, p: Parameter, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # ---- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """{"state": {index: {name: host array or number}}, "hyper": {name: value}}."""
        state = {
            i: {
                k: (np.array(_device.to_host(v)) if hasattr(v, "shape") else v)
                for k, v in s.items()
            }
            for i, s in enumerate(self.state)
            if s
        }
        return {"state": state, "hyper": {k: getattr(self, k) for k in self._hyper}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.get("hyper", {}).items():
            if k in self._hyper:
                setattr(self, k, v)
        self.state = [{} for _ in self.params]
        for i, s in d["state"].items():
            i = int(i)
            if i >= len(self.params):
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: state for parameter {i} "
                    f"but the optimizer has {len(self.params)} parameters"
                )
            p = self.params[i].data
            for k, v in s.items():
                if isinstance(v, np.ndarray) and v.ndim > 0:
                    if tuple(v.shape) != tuple(p.shape):
                        raise ValueError(
                            f"{type(self).__name__}.load_state_dict: {k} of parameter "
                            f"{i} has shape {v.shape}, the parameter {tuple(p.shape)}"
                        )
                    v = _device.like(p, np.ascontiguousarray(v, dtype=np.dtype(p.dtype)))
                elif isinstance(v, np.ndarray):
                    v = v.item()
                self.state[i][k] = v

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._hyper)
        return f"{type(self).__name__}({hp})"


class SGD(Optimizer):
    """Stochastic gradient descent, ``torch.optim.SGD``'s rule.

    g = grad + weight_decay * p; with momentum: buf = g (first step) else
    buf = momentum * buf + (1 - dampening) * g; g = g + momentum * buf if nesterov else buf;
    p -= lr * g.
    """

    _hyper = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        dampening: float = 0.0,
    ):
        super().__init__(params, lr)
        self.momentum = shapes.check_number("SGD", "momentum", momentum, lo=0.0)
        self.weight_decay = shapes.check_number("SGD", "weight_decay", weight_decay, lo=0.0)
        self.dampening = shapes.check_number("SGD", "dampening", dampening)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                "SGD: nesterov needs momentum > 0 and dampening == 0; "
                f"got momentum={momentum}, dampening={dampening}"
            )

    def step(self) -> None:
        """All parameters in one ``sgd_update_many`` call (the numbers checked once)."""
        live = [(p, s) for p, s in zip(self.params, self.state) if p.grad is not None]
        if not live:
            return
        bufs, first = None, True
        if self.momentum != 0:
            first = ["momentum_buffer" not in s for _, s in live]
            for (p, s), f in zip(live, first):
                if f:
                    s["momentum_buffer"] = _device.zeros_like(p.data)
            bufs = [s["momentum_buffer"] for _, s in live]
        F.sgd_update_many(
            [p.data for p, _ in live],
            [p.grad for p, _ in live],
            bufs,
            self.lr,
            self.momentum,
            self.dampening,
            self.weight_decay,
            self.nesterov,
            first,
        )


class Adam(Optimizer):
    """Adam (Kingma and Ba), ``torch.optim.Adam``'s rule with L2 weight decay.

    m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr * m_hat / (sqrt(v_hat) + eps) with
    the bias-corrected m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t).
    """

    _hyper = ("lr", "betas", "eps", "weight_decay")

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"Adam: betas must be a pair of numbers; got {betas!r}")
        b1 = shapes.check_number("Adam", "betas[0]", betas[0], lo=0.0, hi=1.0, hi_open=True)
        b2 = shapes.check_number("Adam", "betas[1]", betas[1], lo=0.0, hi=1.0, hi_open=True)
        self.betas = (b1, b2)
        self.eps = shapes.check_number("Adam", "eps", eps, lo=0.0)
        self.weight_decay = shapes.check_number("Adam", "weight_decay", weight_decay, lo=0.0)

    def _update(self, p: Parameter, state: dict[str, Any]) -> None:
        if not state:
            state["step"] = 0
            state["exp_avg"] = _device.zeros_like(p.data)
            state["exp_avg_sq"] = _device.zeros_like(p.data)
        state["step"] += 1
        F.adam_update(
            p.data,
            p.grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            self.lr,
            self.betas[0],
            self.betas[1],
            self.eps,
            self.weight_decay,
            state["step"],
        )


class RMSprop(Optimizer):
    """RMSprop, ``torch.optim.RMSprop``'s rule.

    s = alpha s + (1-alpha) g^2; centred: avg = sqrt(s - gbar^2) + eps with
    gbar = alpha gbar + (1-alpha) g, else avg = sqrt(s) + eps; with momentum
    buf = momentum buf + g / avg and p -= lr buf, else p -= lr g / avg.
    """

    _hyper = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
    ):
        super().__init__(params, lr)
        self.alpha = shapes.check_number("RMSprop", "alpha", alpha, lo=0.0, hi=1.0)
        self.eps = shapes.check_number("RMSprop", "eps", eps, lo=0.0)
        self.weight_decay = shapes.check_number("RMSprop", "weight_decay", weight_decay, lo=0.0)
        self.momentum = shapes.check_number("RMSprop", "momentum", momentum, lo=0.0)
        self.centered = bool(centered)

    def _update(self, p: Parameter, state: dict[str, Any]) -> None:
        if not state:
            state["step"] = 0
            state["square_avg"] = _device.zeros_like(p.data)
        # buffers the options need, created the first time they do (the options are attributes)
        if self.momentum > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = _device.zeros_like(p.data)
        if self.centered and "grad_avg" not in state:
            state["grad_avg"] = _device.zeros_like(p.data)
        state["step"] += 1
        F.rmsprop_update(
            p.data,
            p.grad,
            state["square_avg"],
            state.get("grad_avg"),
            state.get("momentum_buffer"),
            self.lr,
            self.alpha,
            self.eps,
            self.weight_decay,
            self.momentum,
            self.centered,
        )


class AdaGrad(Optimizer):
    """AdaGrad, ``torch.optim.Adagrad``'s rule.

    clr = lr / (1 + (t-1) lr_decay); sum += g^2; p -= clr * g / (sqrt(sum) + eps).
    """

    _hyper = ("lr", "lr_decay", "weight_decay", "eps")

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
    ):
        super().__init__(params, lr)
        self.lr_decay = shapes.check_number("AdaGrad", "lr_decay", lr_decay, lo=0.0)
        self.weight_decay = shapes.check_number("AdaGrad", "weight_decay", weight_decay, lo=0.0)
        self.initial_accumulator_value = shapes.check_number(
            "AdaGrad", "initial_accumulator_value", initial_accumulator_value, lo=0.0
        )
        self.eps = shapes.check_number("AdaGrad", "eps", eps, lo=0.0)

    def _update(self, p: Parameter, state: dict[str, Any]) -> None:
        if not state:
            state["step"] = 0
            state["sum"] = _device.full_like(p.data, self.initial_accumulator_value)
        state["step"] += 1
        F.adagrad_update(
            p.data,
            p.grad,
            state["sum"],
            self.lr,
            self.lr_decay,
            self.weight_decay,
            self.eps,
            state["step"],
        )


Adagrad = AdaGrad  # PyTorch's spelling

OPTIMIZERS = {"sgd": SGD, "adam": Adam, "rmsprop": RMSprop, "adagrad": AdaGrad}

__all__ = ["SGD", "AdaGrad", "Adagrad", "Adam", "Optimizer", "RMSprop", "OPTIMIZERS"]

# fc.optim.lr_scheduler, as torch.optim.lr_scheduler (also importable by that dotted name)
from . import lr_scheduler  # noqa: E402

sys.modules[__name__ + ".lr_scheduler"] = lr_scheduler
