"""Learning-rate schedules with ``torch.optim.lr_scheduler``'s classes and semantics.

    opt = fc.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = fc.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    for epoch in range(90):
        train_one_epoch(model, opt)
        sched.step()

A scheduler sets ``optimizer.lr`` when it is built (the lr of epoch 0) and at every ``step()``;
``get_last_lr()`` is ``[optimizer.lr]`` as the last step left it. The formulas, step counting
and state dicts are PyTorch's, including its chainable (recursive) forms, so the same calls give
the same learning rates (tested step by step against torch). Our optimizers hold one learning
rate for all parameters (no parameter groups): where PyTorch keeps a value per group, a
scheduler here keeps a one-element list (``base_lrs``, ``get_last_lr()``), and the group's
``initial_lr`` is the optimizer attribute ``optimizer.initial_lr``, set by the first scheduler
built on it with ``last_epoch=-1``. OneCycleLR cycles SGD's and RMSprop's ``momentum`` and
Adam's ``betas[0]``, as PyTorch does.

``state_dict()`` holds plain numbers, strings, lists and dicts (JSON-serialisable), so it can
go into a checkpoint's metadata; to resume, build the same scheduler on the restored optimizer
and call ``load_state_dict``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from . import shapes
from .optim import Optimizer

# Attributes that exist only during a call; never part of a state dict.
_TRANSIENT = ("optimizer", "_is_initial")


def _check_optimizer(name: str, optimizer: Any) -> Optimizer:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"{name}: optimizer must be a fastconv optimizer (fc.optim.SGD, Adam, ...); "
            f"got {type(optimizer).__name__}"
        )
    return optimizer


def _check_int(name: str, arg: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or hasattr(value, "__index__")):
        raise TypeError(f"{name}: {arg} must be an int; got {value!r}")
    v = int(value)
    if v < lo:
        raise ValueError(f"{name}: {arg} must be an int >= {lo}; got {arg}={value!r}")
    return v


def _check_milestones(name: str, milestones: Any, lo: int) -> list[int]:
    ms = [_check_int(name, "milestones[i]", m, lo) for m in milestones]
    if any(b <= a for a, b in zip(ms, ms[1:])):
        raise ValueError(f"{name}: milestones must be strictly increasing; got {ms}")
    return ms


class LRScheduler:
    """Base class: ``step()`` moves ``last_epoch`` on and sets ``optimizer.lr`` to ``get_lr()``.

    Subclasses implement ``get_lr()`` (the chainable form: from the optimizer's current lr) and,
    where PyTorch has one, ``_get_closed_form_lr()`` (from ``base_lrs`` and ``last_epoch``; used
    by SequentialLR when it hands over to a scheduler at a milestone).

    Args:
        optimizer: a fastconv optimizer.
        last_epoch: index of the last epoch; -1 starts the schedule. Resuming with a value
            >= 0 needs ``optimizer.initial_lr`` (left by a scheduler built with -1); building
            with -1 and calling ``load_state_dict`` is the usual way to resume.
    """

    _is_initial: bool = False

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        name = type(self).__name__
        self.optimizer = _check_optimizer(name, optimizer)
        last_epoch = _check_int(name, "last_epoch", last_epoch, -1)
        if last_epoch == -1:
            if getattr(optimizer, "initial_lr", None) is None:
                optimizer.initial_lr = optimizer.lr
        elif getattr(optimizer, "initial_lr", None) is None:
            raise ValueError(
                f"{name}: last_epoch={last_epoch} resumes a schedule, which needs "
                "optimizer.initial_lr (set by a scheduler built with last_epoch=-1); build the "
                "scheduler with last_epoch=-1 and call load_state_dict instead"
            )
        self.base_lrs: list[float] = [optimizer.initial_lr]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self) -> None:
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def get_lr(self) -> list[float]:
        raise NotImplementedError

    def get_last_lr(self) -> list[float]:
        """The learning rate the last step set, as a one-element list (PyTorch's form)."""
        return list(self._last_lr)

    def step(self) -> None:
        """Advance one epoch (or one batch, for per-step schedules such as OneCycleLR).
        Call it after ``optimizer.step()``."""
        self._step_count += 1
        self._update_lr()

    def _update_lr(self, epoch: int | None = None) -> None:
        if epoch is None:
            self.last_epoch += 1
            values = self.get_lr()
        else:
            self.last_epoch = epoch
            closed = getattr(self, "_get_closed_form_lr", None)
            values = closed() if closed is not None else self.get_lr()
        (self.optimizer.lr,) = values
        self._last_lr = [self.optimizer.lr]

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the optimizer (plain, JSON-serialisable values)."""
        return {k: _copy(v) for k, v in self.__dict__.items() if k not in _TRANSIENT}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; the optimizer's own lr comes from its state dict."""
        if not isinstance(state_dict, dict):
            raise TypeError(
                f"{type(self).__name__}.load_state_dict: expected a dict; "
                f"got {type(state_dict).__name__}"
            )
        self.__dict__.update({k: _copy(v) for k, v in state_dict.items() if k not in _TRANSIENT})
        if self.base_lrs:
            self.optimizer.initial_lr = self.base_lrs[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, lr={self._last_lr[0]!r})"


def _copy(v: Any) -> Any:
    """Deep copy of plain containers, so that a state dict never aliases live state."""
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_copy(x) for x in v]
    return v


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (epoch // step_size): decay by ``gamma`` every ``step_size``."""

    def __init__(
        self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1
    ) -> None:
        self.step_size = _check_int("StepLR", "step_size", step_size, 1)
        self.gamma = shapes.check_number("StepLR", "gamma", gamma, lo=0.0, lo_open=True)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return [self.optimizer.lr]
        return [self.optimizer.lr * self.gamma]

    def _get_closed_form_lr(self) -> list[float]:
        return [b * self.gamma ** (self.last_epoch // self.step_size) for b in self.base_lrs]


class MultiStepLR(LRScheduler):
    """lr = base_lr * gamma ** (number of milestones <= epoch); milestones strictly increasing."""

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        self.milestones = _check_milestones("MultiStepLR", milestones, 0)
        self.gamma = shapes.check_number("MultiStepLR", "gamma", gamma, lo=0.0, lo_open=True)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch not in self.milestones:
            return [self.optimizer.lr]
        return [self.optimizer.lr * self.gamma]

    def _get_closed_form_lr(self) -> list[float]:
        k = bisect_right(self.milestones, self.last_epoch)
        return [b * self.gamma**k for b in self.base_lrs]


class ExponentialLR(LRScheduler):
    """lr = base_lr * gamma ** epoch."""

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = shapes.check_number("ExponentialLR", "gamma", gamma, lo=0.0, lo_open=True)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        # resuming (last_epoch >= 0 at construction) must not move the lr a step ahead
        if self._is_initial:
            return [self.optimizer.lr]
        return [self.optimizer.lr * self.gamma]

    def _get_closed_form_lr(self) -> list[float]:
        return [b * self.gamma**self.last_epoch for b in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) (1 + cos(pi epoch / T_max)) / 2, in PyTorch's
    recursive form (which keeps following the cosine past ``T_max``, without restarts)."""

    def __init__(
        self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1
    ) -> None:
        self.T_max = _check_int("CosineAnnealingLR", "T_max", T_max, 1)
        self.eta_min = shapes.check_number("CosineAnnealingLR", "eta_min", eta_min, lo=0.0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        lr, e, t, lo = self.optimizer.lr, self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return [lr]
        if self._step_count == 1 and e > 0:
            return [lo + (b - lo) * (1 + math.cos(e * math.pi / t)) / 2 for b in self.base_lrs]
        if (e - 1 - t) % (2 * t) == 0:
            return [lr + (b - lo) * (1 - math.cos(math.pi / t)) / 2 for b in self.base_lrs]
        return [
            (1 + math.cos(math.pi * e / t)) / (1 + math.cos(math.pi * (e - 1) / t)) * (lr - lo) + lo
        ]

    def _get_closed_form_lr(self) -> list[float]:
        e, t, lo = self.last_epoch, self.T_max, self.eta_min
        return [lo + (b - lo) * (1 + math.cos(math.pi * e / t)) / 2 for b in self.base_lrs]


class LinearLR(LRScheduler):
    """Multiply the lr by a factor going linearly from ``start_factor`` (epoch 0) to
    ``end_factor`` (epoch ``total_iters`` and after): the usual warm-up."""

    def __init__(
        self,
        optimizer: Optimizer,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
        last_epoch: int = -1,
    ) -> None:
        self.start_factor = shapes.check_number(
            "LinearLR", "start_factor", start_factor, lo=0.0, hi=1.0, lo_open=True
        )
        self.end_factor = shapes.check_number("LinearLR", "end_factor", end_factor, lo=0.0, hi=1.0)
        self.total_iters = _check_int("LinearLR", "total_iters", total_iters, 1)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        lr, s, d = self.optimizer.lr, self.start_factor, self.end_factor - self.start_factor
        if self.last_epoch == 0:
            return [lr * s]
        if self._is_initial or self.last_epoch > self.total_iters:
            return [lr]
        return [lr * (1.0 + d / (self.total_iters * s + (self.last_epoch - 1) * d))]

    def _get_closed_form_lr(self) -> list[float]:
        d = self.end_factor - self.start_factor
        k = min(self.total_iters, self.last_epoch)
        return [b * (self.start_factor + d * k / self.total_iters) for b in self.base_lrs]


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith), stepped once per batch: the lr rises from
    ``max_lr / div_factor`` to ``max_lr`` over ``pct_start`` of ``total_steps`` and anneals to
    ``max_lr / div_factor / final_div_factor``; momentum (SGD/RMSprop ``momentum``, Adam
    ``betas[0]``) moves the opposite way between ``max_momentum`` and ``base_momentum``.

    ``total_steps`` or both ``epochs`` and ``steps_per_epoch`` give the cycle's length; the
    schedule may be stepped ``total_steps`` times (the last step is PyTorch's one-past value),
    and one more step raises ValueError.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: float,
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        n = "OneCycleLR"
        _check_optimizer(n, optimizer)
        if total_steps is not None:
            self.total_steps = _check_int(n, "total_steps", total_steps, 1)
        elif epochs is not None and steps_per_epoch is not None:
            e = _check_int(n, "epochs", epochs, 1)
            self.total_steps = e * _check_int(n, "steps_per_epoch", steps_per_epoch, 1)
        else:
            raise ValueError(
                f"{n}: the cycle's length is needed: total_steps, or both epochs and "
                f"steps_per_epoch; got total_steps={total_steps}, epochs={epochs}, "
                f"steps_per_epoch={steps_per_epoch}"
            )
        pct = shapes.check_number(n, "pct_start", pct_start, lo=0.0, hi=1.0)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                f"{n}: anneal_strategy must be 'cos' or 'linear'; got {anneal_strategy!r}"
            )
        self._anneal_func_type = anneal_strategy
        t = self.total_steps
        up = {"start_lr": "initial_lr", "end_lr": "max_lr"}
        up.update(start_momentum="max_momentum", end_momentum="base_momentum")
        if three_phase:
            self._schedule_phases = [
                {"end_step": float(pct * t) - 1, **up},
                {
                    "end_step": float(2 * pct * t) - 2,
                    "start_lr": "max_lr",
                    "end_lr": "initial_lr",
                    "start_momentum": "base_momentum",
                    "end_momentum": "max_momentum",
                },
                {
                    "end_step": t - 1,
                    "start_lr": "initial_lr",
                    "end_lr": "min_lr",
                    "start_momentum": "max_momentum",
                    "end_momentum": "max_momentum",
                },
            ]
        else:
            self._schedule_phases = [
                {"end_step": float(pct * t) - 1, **up},
                {
                    "end_step": t - 1,
                    "start_lr": "max_lr",
                    "end_lr": "min_lr",
                    "start_momentum": "base_momentum",
                    "end_momentum": "max_momentum",
                },
            ]
        # PyTorch keeps these five in the parameter group; here they are the scheduler's
        self.max_lr = shapes.check_number(n, "max_lr", max_lr, lo=0.0, lo_open=True)
        div = shapes.check_number(n, "div_factor", div_factor, lo=0.0, lo_open=True)
        fdiv = shapes.check_number(n, "final_div_factor", final_div_factor, lo=0.0, lo_open=True)
        self.initial_lr = self.max_lr / div
        self.min_lr = self.initial_lr / fdiv
        if last_epoch == -1:
            optimizer.initial_lr = self.initial_lr
        self.cycle_momentum = bool(cycle_momentum)
        if self.cycle_momentum:
            self.use_beta1 = hasattr(optimizer, "betas")
            if not (self.use_beta1 or hasattr(optimizer, "momentum")):
                raise ValueError(
                    f"{n}: cycle_momentum=True needs an optimizer with momentum or betas "
                    f"(SGD, RMSprop, Adam); {type(optimizer).__name__} has neither: pass "
                    "cycle_momentum=False"
                )
            hi = 1.0 if self.use_beta1 else None
            self.max_momentum = shapes.check_number(
                n, "max_momentum", max_momentum, lo=0.0, hi=hi, hi_open=True
            )
            self.base_momentum = shapes.check_number(
                n, "base_momentum", base_momentum, lo=0.0, hi=hi, hi_open=True
            )
            if last_epoch == -1:
                self._set_momentum(optimizer, self.max_momentum)
        super().__init__(optimizer, last_epoch)

    def _set_momentum(self, optimizer: Optimizer, m: float) -> None:
        if self.use_beta1:
            optimizer.betas = (m, *optimizer.betas[1:])
        else:
            optimizer.momentum = m

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self._anneal_func_type == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self) -> list[float]:
        step_num = self.last_epoch
        if step_num > self.total_steps:
            raise ValueError(
                f"OneCycleLR: stepped {step_num} times, past total_steps={self.total_steps}; "
                "build it with the run's total number of batches"
            )
        start_step = 0.0
        for i, phase in enumerate(self._schedule_phases):
            end_step = phase["end_step"]
            if step_num <= end_step or i == len(self._schedule_phases) - 1:
                pct = (step_num - start_step) / (end_step - start_step)
                lr = self._anneal(
                    getattr(self, phase["start_lr"]), getattr(self, phase["end_lr"]), pct
                )
                if self.cycle_momentum:
                    m = self._anneal(
                        getattr(self, phase["start_momentum"]),
                        getattr(self, phase["end_momentum"]),
                        pct,
                    )
                    self._set_momentum(self.optimizer, m)
                break
            start_step = phase["end_step"]
        return [lr]


class _Composite(LRScheduler):
    """State dicts of schedulers that hold others: their own attributes plus each one's."""

    _schedulers: list[LRScheduler]

    @staticmethod
    def _check(name: str, optimizer: Any, schedulers: Sequence[Any]) -> list[LRScheduler]:
        schedulers = list(schedulers)
        if not schedulers:
            raise ValueError(f"{name}: needs at least one scheduler; got none")
        for i, s in enumerate(schedulers):
            if not isinstance(s, LRScheduler):
                raise TypeError(
                    f"{name}: schedulers[{i}] is not a learning-rate scheduler; "
                    f"got {type(s).__name__}"
                )
            if s.optimizer is not optimizer:
                raise ValueError(
                    f"{name}: all schedulers must drive the same optimizer; schedulers[{i}] "
                    f"({type(s).__name__}) drives another one"
                )
        return schedulers

    def state_dict(self) -> dict[str, Any]:
        d = {
            k: _copy(v)
            for k, v in self.__dict__.items()
            if k not in _TRANSIENT and k != "_schedulers"
        }
        d["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return d

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        name = type(self).__name__
        subs = state_dict.get("_schedulers") if isinstance(state_dict, dict) else None
        if not isinstance(subs, list) or len(subs) != len(self._schedulers):
            got = len(subs) if isinstance(subs, list) else "no"
            raise ValueError(
                f"{name}.load_state_dict: the state holds {got} scheduler states for "
                f"{len(self._schedulers)} schedulers"
            )
        own = {k: _copy(v) for k, v in state_dict.items() if k not in _TRANSIENT}
        own.pop("_schedulers")
        self.__dict__.update(own)
        for s, d in zip(self._schedulers, subs):
            s.load_state_dict(d)

    def __repr__(self) -> str:
        inner = ", ".join(type(s).__name__ for s in self._schedulers)
        return f"{type(self).__name__}([{inner}], lr={self._last_lr[0]!r})"


class ChainedScheduler(_Composite):
    """Step several schedulers at once: each ``step()`` calls every one's ``step()`` in order,
    so their (chainable) factors multiply."""

    def __init__(
        self, schedulers: Sequence[LRScheduler], optimizer: Optimizer | None = None
    ) -> None:
        schedulers = list(schedulers)
        if not schedulers:
            raise ValueError("ChainedScheduler: needs at least one scheduler; got none")
        if optimizer is None:
            optimizer = getattr(schedulers[0], "optimizer", None)
        self.optimizer = _check_optimizer("ChainedScheduler", optimizer)
        self._schedulers = self._check("ChainedScheduler", optimizer, schedulers)
        self._last_lr = [optimizer.lr]

    def step(self) -> None:
        for s in self._schedulers:
            s.step()
        self._last_lr = [self.optimizer.lr]


class SequentialLR(_Composite):
    """One scheduler after another: ``schedulers[i]`` runs from ``milestones[i-1]`` on, and at
    each milestone the next one starts again from its epoch 0 (its closed form), e.g. a LinearLR
    warm-up for 5 epochs, then cosine decay: ``SequentialLR(opt, [warm, cos], milestones=[5])``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedulers: Sequence[LRScheduler],
        milestones: Sequence[int],
        last_epoch: int = -1,
    ) -> None:
        n = "SequentialLR"
        self.optimizer = _check_optimizer(n, optimizer)
        self._schedulers = self._check(n, optimizer, schedulers)
        milestones = list(milestones)
        if len(milestones) != len(self._schedulers) - 1:
            raise ValueError(
                f"{n}: needs one milestone fewer than schedulers; got {len(self._schedulers)} "
                f"schedulers and {len(milestones)} milestones"
            )
        self._milestones = _check_milestones(n, milestones, 1)
        self.last_epoch = _check_int(n, "last_epoch", last_epoch, -1) + 1
        optimizer.lr = optimizer.initial_lr  # undo what building the schedulers did
        self._recursive_undo(self)
        idx = bisect_right(self._milestones, 0)
        self._schedulers[idx]._initial_step()
        self._last_lr = self._schedulers[idx].get_last_lr()

    def _recursive_undo(self, sched: LRScheduler) -> None:
        if isinstance(sched, _Composite):
            for s in sched._schedulers:
                self._recursive_undo(s)
        elif sched is not self:
            sched.last_epoch -= 1

    def step(self) -> None:
        self.last_epoch += 1
        idx = bisect_right(self._milestones, self.last_epoch)
        s = self._schedulers[idx]
        if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
            s._update_lr(0)
        else:
            s.step()
        self._last_lr = s.get_last_lr()


def per_batch(scheduler: Any) -> bool:
    """True when ``scheduler`` is meant to step once per batch: a OneCycleLR, or a chain or
    sequence holding one. Every other schedule steps once per epoch."""
    if isinstance(scheduler, OneCycleLR):
        return True
    return any(per_batch(s) for s in getattr(scheduler, "_schedulers", ()))


__all__ = [
    "ChainedScheduler",
    "CosineAnnealingLR",
    "ExponentialLR",
    "LRScheduler",
    "LinearLR",
    "MultiStepLR",
    "OneCycleLR",
    "SequentialLR",
    "StepLR",
    "per_batch",
]
