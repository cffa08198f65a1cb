"""Learning-rate schedulers: the lr (and OneCycleLR's momentum) at every step equals
torch.optim.lr_scheduler's on an equal torch optimizer; chained and sequential schedules;
state_dict round trips resume the same sequence; an error for every argument rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fastconv as fc
from fastconv.optim import lr_scheduler as ls

STEPS = 60


def fc_opt(kind="sgd", lr=0.1):
    p = [fc.Parameter(np.zeros(3))]
    if kind == "sgd":
        return fc.optim.SGD(p, lr=lr, momentum=0.9)
    if kind == "adam":
        return fc.optim.Adam(p, lr=lr, betas=(0.9, 0.99))
    if kind == "rmsprop":
        return fc.optim.RMSprop(p, lr=lr, momentum=0.5)
    return fc.optim.AdaGrad(p, lr=lr)


def torch_opt(kind="sgd", lr=0.1):
    torch = pytest.importorskip("torch")
    p = [torch.zeros(3, requires_grad=True)]
    if kind == "sgd":
        return torch.optim.SGD(p, lr=lr, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(p, lr=lr, betas=(0.9, 0.99))
    if kind == "rmsprop":
        return torch.optim.RMSprop(p, lr=lr, momentum=0.5)
    return torch.optim.Adagrad(p, lr=lr)


def momentum_of(opt):
    """SGD/RMSprop momentum or Adam beta1, on either library's optimizer."""
    if hasattr(opt, "param_groups"):
        g = opt.param_groups[0]
        return g["betas"][0] if "betas" in g else g.get("momentum")
    return opt.betas[0] if hasattr(opt, "betas") else getattr(opt, "momentum", None)


def lr_of(opt):
    return opt.param_groups[0]["lr"] if hasattr(opt, "param_groups") else opt.lr


def trace(opt, sched, steps=STEPS, poke=None):
    """(lr, momentum, get_last_lr) after construction and after each of ``steps`` steps;
    ``poke(opt, i)`` may change the lr from outside between steps (chainable forms)."""
    out = [(lr_of(opt), momentum_of(opt), sched.get_last_lr()[0])]
    for i in range(steps):
        opt.step()  # torch expects optimizer.step() before scheduler.step()
        sched.step()
        out.append((lr_of(opt), momentum_of(opt), sched.get_last_lr()[0]))
        if poke is not None:
            poke(opt, i)
    return out


def assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        for x, y in zip(a, b):
            if y is None:
                assert x is None or isinstance(x, float), i
            else:
                assert x == pytest.approx(y, rel=1e-12, abs=0), (i, a, b)


# Each case builds a scheduler from a module (ours or torch's) and an optimizer.
CASES = {
    "step": lambda m, o: m.StepLR(o, step_size=7, gamma=0.5),
    "step1": lambda m, o: m.StepLR(o, step_size=1, gamma=0.9),
    "multistep": lambda m, o: m.MultiStepLR(o, milestones=[3, 10, 11, 40], gamma=0.3),
    "exponential": lambda m, o: m.ExponentialLR(o, gamma=0.93),
    "cosine": lambda m, o: m.CosineAnnealingLR(o, T_max=17, eta_min=1e-3),
    "cosine_zero_min": lambda m, o: m.CosineAnnealingLR(o, T_max=5),
    "linear_warmup": lambda m, o: m.LinearLR(o, start_factor=0.1, total_iters=9),
    "linear_default": lambda m, o: m.LinearLR(o),
    "linear_decay": lambda m, o: m.LinearLR(o, start_factor=1.0, end_factor=0.05, total_iters=20),
    "onecycle": lambda m, o: m.OneCycleLR(o, max_lr=0.8, total_steps=STEPS),
    "onecycle_epochs": lambda m, o: m.OneCycleLR(
        o, max_lr=0.5, epochs=6, steps_per_epoch=10, pct_start=0.25, anneal_strategy="linear"
    ),
    "onecycle_three_phase": lambda m, o: m.OneCycleLR(
        o,
        max_lr=2.0,
        total_steps=STEPS + 3,
        three_phase=True,
        div_factor=10.0,
        final_div_factor=100.0,
        base_momentum=0.8,
        max_momentum=0.9,
    ),
    "onecycle_no_momentum": lambda m, o: m.OneCycleLR(
        o, max_lr=0.3, total_steps=STEPS, cycle_momentum=False
    ),
    "chained": lambda m, o: m.ChainedScheduler(
        [m.LinearLR(o, start_factor=0.2, total_iters=5), m.ExponentialLR(o, gamma=0.95)]
    ),
    "chained_step_cos": lambda m, o: m.ChainedScheduler(
        [m.StepLR(o, step_size=4, gamma=0.7), m.CosineAnnealingLR(o, T_max=25, eta_min=0.0)]
    ),
    "warmup_then_cosine": lambda m, o: m.SequentialLR(
        o,
        [m.LinearLR(o, start_factor=0.1, total_iters=5), m.CosineAnnealingLR(o, T_max=40)],
        milestones=[5],
    ),
    "sequential_three": lambda m, o: m.SequentialLR(
        o,
        [
            m.LinearLR(o, start_factor=0.5, total_iters=4),
            m.StepLR(o, step_size=3, gamma=0.5),
            m.ExponentialLR(o, gamma=0.9),
        ],
        milestones=[6, 20],
    ),
    "warmup_then_multistep": lambda m, o: m.SequentialLR(
        o,
        [m.LinearLR(o, start_factor=0.3, total_iters=3), m.MultiStepLR(o, [2, 10], gamma=0.1)],
        milestones=[3],
    ),
}


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lr_sequence_matches_torch(case, kind):
    import torch.optim.lr_scheduler as tls

    to = torch_opt(kind)
    theirs = trace(to, CASES[case](tls, to))
    o = fc_opt(kind)
    ours = trace(o, CASES[case](ls, o))
    assert_same(ours, theirs)
    assert o.initial_lr == to.param_groups[0]["initial_lr"]


@pytest.mark.parametrize("kind", ["rmsprop", "adagrad"])
def test_onecycle_on_rmsprop_and_adagrad_matches_torch(kind):
    import torch.optim.lr_scheduler as tls

    kw = {"max_lr": 0.4, "total_steps": 30, "cycle_momentum": kind == "rmsprop"}
    to = torch_opt(kind)
    theirs = trace(to, tls.OneCycleLR(to, **kw), steps=30)
    o = fc_opt(kind)
    assert_same(trace(o, ls.OneCycleLR(o, **kw), steps=30), theirs)


@pytest.mark.parametrize("case", ["step", "multistep", "exponential", "cosine", "linear_warmup"])
def test_lr_changed_from_outside_is_followed_like_torch(case):
    """The chainable forms scale the optimizer's current lr, so an lr set by hand between
    steps carries on, as in torch."""
    import torch.optim.lr_scheduler as tls

    def poke(opt, i):
        if i in (4, 21):
            if hasattr(opt, "param_groups"):
                opt.param_groups[0]["lr"] *= 0.5
            else:
                opt.lr *= 0.5

    to = torch_opt()
    theirs = trace(to, CASES[case](tls, to), poke=poke)
    o = fc_opt()
    assert_same(trace(o, CASES[case](ls, o), poke=poke), theirs)


@pytest.mark.parametrize(
    "cls,kw", [("ExponentialLR", {"gamma": 0.8}), ("CosineAnnealingLR", {"T_max": 9})]
)
def test_last_epoch_resume_matches_torch(cls, kw):
    """Built with last_epoch >= 0 on an optimizer that already has initial_lr."""
    import torch.optim.lr_scheduler as tls

    to, o = torch_opt(), fc_opt()
    getattr(tls, cls)(to, **kw)
    getattr(ls, cls)(o, **kw)
    to.param_groups[0]["lr"], o.lr = 0.05, 0.05
    theirs = trace(to, getattr(tls, cls)(to, last_epoch=4, **kw), steps=20)
    assert_same(trace(o, getattr(ls, cls)(o, last_epoch=4, **kw), steps=20), theirs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_round_trip_resumes_the_same_sequence(case):
    kind = "adam" if "onecycle" in case else "sgd"
    o = fc_opt(kind)
    full = trace(o, CASES[case](ls, o))

    o = fc_opt(kind)
    s = CASES[case](ls, o)
    first = trace(o, s, steps=23)
    opt_state = o.state_dict()
    sched_state = json.loads(json.dumps(s.state_dict()))  # plain JSON-able values

    o2 = fc_opt(kind, lr=7.0)  # another lr: the state must win
    s2 = CASES[case](ls, o2)
    o2.load_state_dict(opt_state)
    s2.load_state_dict(sched_state)
    assert s2.get_last_lr() == s.get_last_lr()
    rest = trace(o2, s2, steps=STEPS - 23)
    assert_same(first + rest[1:], full)


def test_state_dict_is_a_copy():
    o = fc_opt()
    s = ls.MultiStepLR(o, [2, 4])
    d = s.state_dict()
    d["milestones"].append(99)
    d["base_lrs"][0] = 5.0
    assert s.milestones == [2, 4] and s.base_lrs == [0.1]
    assert "optimizer" not in d


def test_composite_state_dict_holds_each_scheduler():
    o = fc_opt()
    s = ls.SequentialLR(o, [ls.LinearLR(o), ls.StepLR(o, 2)], milestones=[5])
    d = s.state_dict()
    assert len(d["_schedulers"]) == 2 and d["_milestones"] == [5]
    with pytest.raises(ValueError, match=r"SequentialLR.load_state_dict: the state holds 1 "):
        s.load_state_dict({**d, "_schedulers": d["_schedulers"][:1]})


def test_module_is_reachable_like_torchs():
    from fastconv.optim.lr_scheduler import StepLR

    assert fc.optim.lr_scheduler is ls and StepLR is ls.StepLR
    assert issubclass(ls.SequentialLR, ls.LRScheduler)


def test_per_batch_rule():
    o = fc_opt()
    one = ls.OneCycleLR(o, max_lr=0.1, total_steps=10)
    assert ls.per_batch(one)
    assert ls.per_batch(ls.ChainedScheduler([one]))
    o2 = fc_opt()
    assert not ls.per_batch(ls.StepLR(o2, 3))
    assert not ls.per_batch(ls.SequentialLR(o2, [ls.LinearLR(o2), ls.StepLR(o2, 2)], [3]))


def test_onecycle_stepped_past_total_steps():
    o = fc_opt()
    s = ls.OneCycleLR(o, max_lr=0.1, total_steps=4)
    for _ in range(4):  # torch allows this many: the last is one past the cycle
        s.step()
    with pytest.raises(ValueError, match=r"OneCycleLR: stepped 5 times, past total_steps=4"):
        s.step()


def _errors():
    o = fc_opt()
    ad = fc_opt("adagrad")
    other = fc_opt()
    v, t = ValueError, TypeError
    return [
        (lambda: ls.StepLR(o, step_size=0), v, r"StepLR: step_size must be an int >= 1"),
        (lambda: ls.StepLR(o, step_size=2.5), t, r"StepLR: step_size must be an int"),
        (lambda: ls.StepLR(o, 2, gamma=0.0), v, r"StepLR: gamma must be in \(0, inf\]"),
        (lambda: ls.StepLR(o, 2, gamma=-1), v, r"StepLR: gamma must be in"),
        (lambda: ls.MultiStepLR(o, [3, 3]), v, r"MultiStepLR: milestones must be strictly inc"),
        (lambda: ls.MultiStepLR(o, [5, 2]), v, r"MultiStepLR: milestones must be strictly inc"),
        (lambda: ls.MultiStepLR(o, [-1, 2]), v, r"MultiStepLR: milestones\[i\] must be an int"),
        (lambda: ls.ExponentialLR(o, gamma=0), v, r"ExponentialLR: gamma must be in \(0"),
        (lambda: ls.CosineAnnealingLR(o, T_max=0), v, r"CosineAnnealingLR: T_max must be"),
        (lambda: ls.CosineAnnealingLR(o, 5, eta_min=-1), v, r"CosineAnnealingLR: eta_min"),
        (lambda: ls.LinearLR(o, start_factor=0), v, r"LinearLR: start_factor must be in \(0, 1\]"),
        (lambda: ls.LinearLR(o, end_factor=1.5), v, r"LinearLR: end_factor must be in \[0, 1\]"),
        (lambda: ls.LinearLR(o, total_iters=0), v, r"LinearLR: total_iters must be an int >= 1"),
        (lambda: ls.OneCycleLR(o, max_lr=0.1), v, r"OneCycleLR: the cycle's length is needed"),
        (lambda: ls.OneCycleLR(o, 0.1, epochs=3), v, r"OneCycleLR: the cycle's length"),
        (lambda: ls.OneCycleLR(o, 0.1, total_steps=0), v, r"OneCycleLR: total_steps must be"),
        (lambda: ls.OneCycleLR(o, 0.1, 10, pct_start=1.5), v, r"OneCycleLR: pct_start must be"),
        (lambda: ls.OneCycleLR(o, 0.0, 10), v, r"OneCycleLR: max_lr must be in \(0"),
        (lambda: ls.OneCycleLR(o, 0.1, 10, anneal_strategy="exp"), v, r"anneal_strategy must"),
        (lambda: ls.OneCycleLR(ad, 0.1, 10), v, r"OneCycleLR: cycle_momentum=True needs an "),
        (lambda: ls.OneCycleLR(fc_opt("adam"), 0.1, 10, max_momentum=1.0), v, r"max_momentum"),
        (lambda: ls.StepLR(object(), 2), t, r"StepLR: optimizer must be a fastconv optimizer"),
        (lambda: ls.OneCycleLR("sgd", 0.1, 10), t, r"OneCycleLR: optimizer must be a fastconv"),
        (lambda: ls.StepLR(fc_opt(), 2, last_epoch=3), v, r"StepLR: last_epoch=3 resumes"),
        (lambda: ls.StepLR(o, 2, last_epoch=-2), v, r"StepLR: last_epoch must be an int >= -1"),
        (lambda: ls.ChainedScheduler([]), v, r"ChainedScheduler: needs at least one scheduler"),
        (lambda: ls.ChainedScheduler([3]), t, r"ChainedScheduler: optimizer must be a fastconv"),
        (
            lambda: ls.ChainedScheduler([ls.StepLR(o, 2), ls.StepLR(other, 2)]),
            v,
            r"ChainedScheduler: all schedulers must drive the same optimizer; schedulers\[1\]",
        ),
        (lambda: ls.SequentialLR(o, [], []), v, r"SequentialLR: needs at least one scheduler"),
        (
            lambda: ls.SequentialLR(o, [ls.LinearLR(o), ls.StepLR(o, 2)], []),
            v,
            r"SequentialLR: needs one milestone fewer than schedulers; got 2 schedulers and 0",
        ),
        (
            lambda: ls.SequentialLR(o, [ls.LinearLR(o), ls.StepLR(o, 2), ls.LinearLR(o)], [4, 4]),
            v,
            r"SequentialLR: milestones must be strictly increasing",
        ),
        (
            lambda: ls.SequentialLR(o, [ls.LinearLR(o), "x"], [2]),
            t,
            r"SequentialLR: schedulers\[1\] is not a learning-rate scheduler",
        ),
    ]


@pytest.mark.parametrize("i", range(len(_errors())))
def test_argument_errors(i):
    fn, exc, msg = _errors()[i]
    with pytest.raises(exc, match=msg):
        fn()
