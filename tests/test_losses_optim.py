"""Losses, optimizers (hand-computed steps, the oracle, torch.optim) and initialisers."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastconv as fc
from fastconv import init
from fastconv import reference as R
from fastconv.layers import Parameter
from tests.helpers import assert_close


def rnd(shape, seed=0, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


# --------------------------------------------------------------------------- losses


def test_cross_entropy_loss_returns_scalar_tensor_and_gradient():
    z = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
    labels = np.array([0, 2])
    loss_fn = fc.CrossEntropyLoss()
    zt = fc.Tensor(z, requires_grad=True)
    loss = loss_fn(zt, labels)
    assert isinstance(loss, fc.Tensor) and loss.shape == () and loss.dtype == np.float64
    assert isinstance(float(loss), float)
    # by hand: -log softmax(z)[label], averaged
    sm = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert float(loss) == pytest.approx(-(np.log(sm[0, 0]) + np.log(sm[1, 2])) / 2, rel=1e-12)
    loss.backward()
    expected = sm.copy()
    expected[[0, 1], labels] -= 1
    np.testing.assert_allclose(zt.grad, expected / 2, rtol=1e-12)


def test_cross_entropy_loss_matches_torch():
    torch = pytest.importorskip("torch")
    z, labels = rnd((16, 10), scale=5).astype(np.float32), np.arange(16) % 10
    loss_fn = fc.CrossEntropyLoss()
    zf = fc.Tensor(z, requires_grad=True)
    loss = loss_fn(zf, labels)
    zt = torch.from_numpy(z).requires_grad_()
    lt = torch.nn.CrossEntropyLoss()(zt, torch.from_numpy(labels))
    lt.backward()
    assert float(loss) == pytest.approx(lt.item(), rel=1e-5)
    loss.backward()
    np.testing.assert_allclose(zf.grad, zt.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_mse_loss_matches_hand_computation_and_torch():
    p, t = np.array([[1.0, 2.0], [3.0, 5.0]]), np.array([[1.5, 2.0], [2.0, 5.0]])
    loss_fn = fc.MSELoss()
    pf = fc.Tensor(p, requires_grad=True)
    loss = loss_fn(pf, t)
    assert float(loss) == pytest.approx((0.25 + 1.0) / 4)
    loss.backward()
    np.testing.assert_allclose(pf.grad, 2 * (p - t) / 4)
    torch = pytest.importorskip("torch")
    pt = torch.from_numpy(p).requires_grad_()
    torch.nn.MSELoss()(pt, torch.from_numpy(t)).backward()
    np.testing.assert_allclose(pf.grad, pt.grad.numpy())


def test_loss_backward_without_a_recorded_graph_is_a_clear_error():
    """A loss of logits that require no gradient has nothing to run backward through."""
    loss = fc.CrossEntropyLoss()(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(RuntimeError, match=r"does not require a gradient and has no recorded op"):
        loss.backward()
    assert repr(fc.MSELoss()) == "MSELoss()"


# --------------------------------------------------------------------------- optimizers


def _param(values, grad):
    p = Parameter(np.array(values, dtype=np.float64))
    p.grad = np.array(grad, dtype=np.float64)
    return p


def test_sgd_hand_computed_steps():
    p = _param([1.0, -2.0], [0.5, 0.25])
    opt = fc.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.step()  # g = grad + 0.01 p; buf = g; p -= 0.1 g
    g1 = np.array([0.5 + 0.01, 0.25 - 0.02])
    np.testing.assert_allclose(p.data, [1.0, -2.0] - 0.1 * g1)
    p_prev = p.data.copy()
    opt.step()  # buf = 0.9 buf + g
    g2 = np.array([0.5, 0.25]) + 0.01 * p_prev
    np.testing.assert_allclose(p.data, p_prev - 0.1 * (0.9 * g1 + g2))


def test_sgd_plain_and_nesterov_hand_computed():
    p = _param([1.0], [2.0])
    fc.optim.SGD([p], lr=0.5).step()
    assert p.data[0] == pytest.approx(0.0)
    p = _param([1.0], [2.0])
    opt = fc.optim.SGD([p], lr=0.1, momentum=0.5, nesterov=True)
    opt.step()  # buf = 2; g = 2 + 0.5*2 = 3
    assert p.data[0] == pytest.approx(1.0 - 0.3)
    opt.step()  # buf = 0.5*2 + 2 = 3; g = 2 + 1.5 = 3.5
    assert p.data[0] == pytest.approx(0.7 - 0.35)


def test_adam_hand_computed_first_step():
    # Step 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps) = lr * sign(g).
    p = _param([1.0, 1.0], [0.3, -2.0])
    fc.optim.Adam([p], lr=0.01).step()
    np.testing.assert_allclose(p.data, [0.99, 1.01], rtol=1e-6)


def test_rmsprop_and_adagrad_hand_computed():
    p = _param([1.0], [2.0])
    fc.optim.RMSprop([p], lr=0.01, alpha=0.9, eps=0.0).step()  # s = 0.1*4; p -= 0.01*2/sqrt(s)
    assert p.data[0] == pytest.approx(1.0 - 0.02 / math.sqrt(0.4))
    p = _param([1.0], [2.0])
    opt = fc.optim.AdaGrad([p], lr=0.1, eps=0.0)
    opt.step()  # sum = 4; p -= 0.1 * 2/2
    assert p.data[0] == pytest.approx(0.9)
    opt.step()  # sum = 8; p -= 0.1 * 2/sqrt(8)
    assert p.data[0] == pytest.approx(0.9 - 0.2 / math.sqrt(8))
    assert fc.optim.Adagrad is fc.optim.AdaGrad


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sgd_and_adam_match_the_oracle_over_steps(dtype):
    p0, grads = rnd((3, 4)).astype(dtype), [rnd((3, 4), seed=s).astype(dtype) for s in range(4)]
    p = Parameter(p0.copy())
    opt = fc.optim.SGD([p], lr=0.05, momentum=0.9, weight_decay=1e-3, dampening=0.1)
    ref_p, ref_buf = p0.copy(), np.zeros_like(p0)
    for i, g in enumerate(grads):
        p.grad = g
        opt.step()
        ref_p, ref_buf = R.sgd_update(ref_p, g, ref_buf, 0.05, 0.9, 0.1, 1e-3, False, i == 0)
        assert_close(p.data, ref_p, dtype)
    p = Parameter(p0.copy())
    opt = fc.optim.Adam([p], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)
    ref_p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for i, g in enumerate(grads):
        p.grad = g
        opt.step()
        ref_p, m, v = R.adam_update(ref_p, g, m, v, 1e-2, 0.8, 0.99, 1e-6, 0.01, i + 1)
        assert_close(p.data, ref_p, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rmsprop_and_adagrad_match_the_oracle_over_steps(dtype):
    p0, grads = rnd((3, 4)).astype(dtype), [rnd((3, 4), seed=s).astype(dtype) for s in range(4)]
    p = Parameter(p0.copy())
    opt = fc.optim.RMSprop(
        [p], lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=0.5, centered=True
    )
    ref_p, sq, ga, buf = p0.copy(), np.zeros_like(p0), np.zeros_like(p0), np.zeros_like(p0)
    for g in grads:
        p.grad = g
        opt.step()
        ref_p, sq, ga, buf = R.rmsprop_update(
            ref_p, g, sq, ga, buf, 1e-2, 0.9, 1e-6, 0.01, 0.5, True
        )
        assert_close(p.data, ref_p, dtype)
    p = Parameter(p0.copy())
    opt = fc.optim.AdaGrad(
        [p], lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1
    )
    ref_p, s = p0.copy(), np.full_like(p0, 0.1)
    for i, g in enumerate(grads):
        p.grad = g
        opt.step()
        ref_p, s = R.adagrad_update(ref_p, g, s, 0.1, 0.01, 0.01, 1e-10, i + 1)
        assert_close(p.data, ref_p, dtype)


OPTIMS = [
    ("SGD", dict(lr=0.1), dict(lr=0.1)),
    (
        "SGD",
        dict(lr=0.1, momentum=0.9, weight_decay=0.01),
        dict(lr=0.1, momentum=0.9, weight_decay=0.01),
    ),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True), dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.1, momentum=0.5, dampening=0.3), dict(lr=0.1, momentum=0.5, dampening=0.3)),
    ("Adam", dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01), dict(lr=0.01)),
    (
        "RMSprop",
        dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
        dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
    ),
    (
        "AdaGrad",
        dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
        dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    ),
]


@pytest.mark.parametrize("name,ours_kw,torch_kw", OPTIMS)
def test_optimizers_match_torch(name, ours_kw, torch_kw):
    torch = pytest.importorskip("torch")
    tname = "Adagrad" if name == "AdaGrad" else name
    p0 = rnd((4, 3))
    p = Parameter(p0.copy())
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = getattr(fc.optim, name)([p], **ours_kw)
    topt = getattr(torch.optim, tname)([tp], **torch_kw)
    for s in range(5):
        g = rnd((4, 3), seed=10 + s)
        p.grad = g
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
        np.testing.assert_allclose(
            p.data, tp.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=f"step {s}"
        )


def test_optimizer_skips_parameters_without_gradients_and_zero_grad():
    a, b = _param([1.0], [1.0]), Parameter(np.array([5.0]))
    opt = fc.optim.SGD([a, b], lr=1.0)
    opt.step()
    assert b.data[0] == 5.0 and a.data[0] == 0.0
    opt.zero_grad()
    assert a.grad is None


def test_optimizer_state_dict_round_trip():
    p = _param([1.0, 2.0], [0.1, 0.2])
    opt = fc.optim.Adam([p], lr=0.01)
    opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["step"] == 1 and sd["hyper"]["lr"] == 0.01
    q = Parameter(p.data.copy())
    opt2 = fc.optim.Adam([q], lr=0.5)
    opt2.load_state_dict(sd)
    assert opt2.lr == 0.01
    p.grad = q.grad = np.array([0.3, -0.1])
    opt.step()
    opt2.step()
    np.testing.assert_array_equal(p.data, q.data)
    with pytest.raises(ValueError, match=r"state for parameter 3"):
        opt2.load_state_dict({"state": {3: {"step": 1}}})
    with pytest.raises(ValueError, match=r"exp_avg of parameter 0 has shape"):
        opt2.load_state_dict({"state": {0: {"exp_avg": np.zeros(5)}}})


def test_learning_rate_is_a_plain_attribute():
    p = _param([1.0], [1.0])
    opt = fc.optim.SGD([p], lr=1.0)
    opt.lr = 0.5
    opt.step()
    assert p.data[0] == 0.5
    assert repr(opt).startswith("SGD(lr=0.5")


@pytest.mark.parametrize(
    "make,exc,msg",
    [
        (lambda p: fc.optim.SGD([], lr=0.1), ValueError, r"SGD: got an empty parameter list"),
        (
            lambda p: fc.optim.SGD([np.zeros(2)], lr=0.1),
            TypeError,
            r"SGD: params\[0\] is not a fastconv Parameter",
        ),
        (lambda p: fc.optim.SGD(p, lr=-0.1), ValueError, r"SGD: lr must be in \[0, inf\]"),
        (
            lambda p: fc.optim.SGD(p, lr=0.1, nesterov=True),
            ValueError,
            r"SGD: nesterov needs momentum > 0",
        ),
        (lambda p: fc.optim.SGD(p, lr=0.1, momentum=-1), ValueError, r"SGD: momentum must be"),
        (lambda p: fc.optim.Adam(p, betas=(0.9,)), TypeError, r"Adam: betas must be a pair"),
        (
            lambda p: fc.optim.Adam(p, betas=(0.9, 1.0)),
            ValueError,
            r"Adam: betas\[1\] must be in \[0, 1\)",
        ),
        (lambda p: fc.optim.RMSprop(p, alpha=2.0), ValueError, r"RMSprop: alpha must be in"),
        (lambda p: fc.optim.AdaGrad(p, lr_decay=-1), ValueError, r"AdaGrad: lr_decay must be"),
    ],
)
def test_optimizer_errors(make, exc, msg):
    with pytest.raises(exc, match=msg):
        make([_param([1.0], [1.0])])


def test_a_model_learns_with_every_optimizer():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    for name, kw in [
        ("SGD", dict(lr=0.5, momentum=0.9)),
        ("Adam", dict(lr=0.05)),
        ("RMSprop", dict(lr=0.01)),
        ("AdaGrad", dict(lr=0.5)),
    ]:
        model = fc.Sequential(
            fc.Linear(4, 8, dtype=np.float64, rng=1),
            fc.Tanh(),
            fc.Linear(8, 2, dtype=np.float64, rng=2),
        )
        opt = getattr(fc.optim, name)(model.parameters(), **kw)
        loss_fn = fc.CrossEntropyLoss()
        first = float(loss_fn(model(x), y))
        for _ in range(50):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert float(loss_fn(model(x), y)) < 0.5 * first, name


# --------------------------------------------------------------------------- initialisers


def test_fans_and_gains():
    assert init.fan_in_and_fan_out((32, 16, 3, 3)) == (144, 288)
    assert init.fan_in_and_fan_out((10, 20)) == (20, 10)
    assert init.calculate_gain("relu") == pytest.approx(math.sqrt(2))
    assert init.calculate_gain("tanh") == pytest.approx(5 / 3)
    assert init.calculate_gain("leaky_relu", 0.2) == pytest.approx(math.sqrt(2 / 1.04))
    assert init.calculate_gain("linear") == 1.0
    with pytest.raises(ValueError, match=r"unsupported nonlinearity 'swish'"):
        init.calculate_gain("swish")
    with pytest.raises(ValueError, match=r"at least 2 dimensions"):
        init.fan_in_and_fan_out((5,))


@pytest.mark.parametrize(
    "fn,kw,expected_std",
    [
        (init.kaiming_uniform_, dict(nonlinearity="relu"), math.sqrt(2 / 400)),
        (init.kaiming_normal_, dict(nonlinearity="relu"), math.sqrt(2 / 400)),
        (init.kaiming_normal_, dict(nonlinearity="relu", mode="fan_out"), math.sqrt(2 / 200)),
        (init.xavier_uniform_, {}, math.sqrt(2 / 600)),
        (init.xavier_normal_, dict(gain=2.0), 2 * math.sqrt(2 / 600)),
        (init.lecun_uniform_, {}, math.sqrt(1 / 400)),
        (init.lecun_normal_, {}, math.sqrt(1 / 400)),
    ],
)
def test_initialiser_scales(fn, kw, expected_std):
    w = np.empty((200, 400))
    out = fn(w, rng=0, **kw)
    assert out is w
    assert w.std() == pytest.approx(expected_std, rel=0.02)
    assert abs(w.mean()) < 0.05 * expected_std * 10


def test_kaiming_uniform_bound_matches_torch():
    torch = pytest.importorskip("torch")
    w = init.kaiming_uniform_(np.empty((64, 27)), a=math.sqrt(5), rng=0)
    t = torch.empty(64, 27)
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    bound = 1 / math.sqrt(27)  # what a=sqrt(5) works out to
    assert np.abs(w).max() <= bound and t.abs().max().item() <= bound


def test_mode_error_and_simple_fills():
    with pytest.raises(ValueError, match=r"mode must be 'fan_in' or 'fan_out'"):
        init.kaiming_normal_(np.empty((2, 2)), mode="fan_avg")
    assert init.zeros_(np.ones(3)).sum() == 0 and init.ones_(np.zeros(3)).sum() == 3


def test_seeding_rules(monkeypatch):
    monkeypatch.setattr(init, "_default_rng", None)  # restored after the test
    a = init.kaiming_normal_(np.empty((5, 5)), rng=42)
    b = init.kaiming_normal_(np.empty((5, 5)), rng=np.random.default_rng(42))
    np.testing.assert_array_equal(a, b)
    init.manual_seed(7)
    c = fc.Linear(3, 3).weight.data.copy()
    fc.manual_seed(7)
    d = fc.Linear(3, 3).weight.data.copy()
    np.testing.assert_array_equal(c, d)
    with pytest.raises(TypeError, match=r"rng must be an int seed"):
        init.get_rng(1.5)
