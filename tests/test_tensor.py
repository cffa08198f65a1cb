"""fc.Tensor and the tape: the Tensor API, gradient accumulation and fan-out, aliasing,
freeing, no_grad/detach, errors, determinism, deep graphs and frozen parameters."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import fastconv as fc
from fastconv import functional as F
from fastconv import ops
from fastconv.tensor import is_grad_enabled


def rnd(*shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def leaf(*shape, dtype=np.float64, seed=0):
    return fc.Tensor(rnd(*shape, dtype=dtype, seed=seed), requires_grad=True)


# --------------------------------------------------------------------------- what a Tensor is


def test_construction_and_properties() -> None:
    a = rnd(2, 3, dtype=np.float32)
    t = fc.Tensor(a)
    assert t.data is a  # host data is kept, not copied
    assert t.shape == (2, 3) and t.ndim == 2 and t.size == 6 and t.numel() == 6 and len(t) == 2
    assert t.dtype == np.float32 and t.device == "cpu"
    assert t.grad is None and t.requires_grad is False and t.is_leaf and t.grad_fn is None
    assert fc.Tensor([[1, 2]], dtype=np.float64).dtype == np.float64
    assert fc.tensor([1.0, 2.0], requires_grad=True).requires_grad
    assert fc.Tensor(t).data is a  # a Tensor of a Tensor shares the array


def test_numpy_array_item_float() -> None:
    a = rnd(2, 3)
    t = fc.Tensor(a)
    assert t.numpy() is a
    np.testing.assert_array_equal(np.asarray(t), a)
    assert np.asarray(t, dtype=np.float32).dtype == np.float32
    assert np.array(t).shape == (2, 3)
    s = fc.Tensor(np.array(2.5))
    assert s.item() == 2.5 and float(s) == 2.5 and isinstance(s.item(), float)
    assert int(fc.Tensor(np.array([7.0]))) == 7
    assert t.tolist() == a.tolist()
    with pytest.raises(ValueError, match=r"item.*\(2, 3\)"):
        t.item()


def test_repr() -> None:
    t = fc.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    assert repr(t) == "tensor([1., 2.], dtype=float64, requires_grad=True)"
    assert repr(t * 2.0) == "tensor([2., 4.], dtype=float64, grad_fn=<mul>)"
    assert repr(fc.Tensor(np.zeros(1, np.float32))) == "tensor([0.], dtype=float32)"


def test_to_and_detach() -> None:
    x = leaf(2, 3)
    assert x.to("cpu") is x and x.cpu() is x and x.to(np.float64) is x
    y = x.to(np.float32)
    assert y.dtype == np.float32 and y.grad_fn == "to"
    np.testing.assert_array_equal(y.numpy(), x.numpy().astype(np.float32))
    d = (x * 2.0).detach()
    assert d.is_leaf and not d.requires_grad and d.grad_fn is None
    assert x.detach().data is x.data  # same data, cut from the graph


def test_to_rejects_what_it_cannot_do() -> None:
    x = leaf(2, 3)
    with pytest.raises(TypeError, match="float32 or float64"):
        x.to(np.int32)
    with pytest.raises(ValueError, match="device"):
        x.to("tpu")


def test_shape_ops_and_reductions_values() -> None:
    a = rnd(2, 3, 4)
    x = fc.Tensor(a)
    np.testing.assert_array_equal(x.reshape(6, 4).numpy(), a.reshape(6, 4))
    np.testing.assert_array_equal(x.reshape((4, -1)).numpy(), a.reshape(4, -1))
    np.testing.assert_array_equal(x.view(-1).numpy(), a.reshape(-1))
    np.testing.assert_array_equal(x.flatten().numpy(), a.reshape(-1))  # Tensor.flatten: from 0
    np.testing.assert_array_equal(x.flatten(1).numpy(), a.reshape(2, 12))
    np.testing.assert_array_equal(F.flatten(x).numpy(), a.reshape(2, 12))  # functional: from 1
    np.testing.assert_array_equal(fc.Tensor(a[0]).T.numpy(), a[0].T)
    np.testing.assert_allclose(x.sum().numpy(), a.sum())
    np.testing.assert_allclose(x.sum(axis=1).numpy(), a.sum(axis=1))
    np.testing.assert_allclose(
        x.mean(axis=(0, 2), keepdims=True).numpy(), a.mean((0, 2), keepdims=True)
    )
    assert x.sum().shape == () and x.mean(-1, keepdims=True).shape == (2, 3, 1)
    np.testing.assert_array_equal(x.argmax(axis=1), a.argmax(axis=1))


@pytest.mark.parametrize(
    "index",
    [
        1,
        -1,
        (slice(None), slice(1, 3)),
        (Ellipsis, 0),
        (slice(None, None, 2),),
        (None, 0),
        (0, 1, 2),
    ],
)
def test_indexing_values_and_grad(index) -> None:
    a = rnd(3, 4, 5)
    x = fc.Tensor(a, requires_grad=True)
    y = x[index]
    np.testing.assert_array_equal(y.numpy(), a[index])
    y.sum().backward()
    expected = np.zeros_like(a)
    expected[index] = 1.0
    np.testing.assert_array_equal(x.grad, expected)


def test_an_int_index_to_every_axis_gives_a_0d_tensor() -> None:
    x = fc.Tensor(np.arange(3.0), requires_grad=True)
    y = x[1]
    assert y.shape == () and float(y) == 1.0
    (y * 2.0).backward()
    np.testing.assert_array_equal(x.grad, [0.0, 2.0, 0.0])


def test_arithmetic_with_arrays_and_scalars_both_sides() -> None:
    a, b = rnd(2, 3), rnd(2, 3, seed=1) + 3.0
    x = fc.Tensor(a)
    cases = [
        (x + b, a + b), (b + x, b + a), (x + 2, a + 2), (2 + x, 2 + a),
        (x - b, a - b), (b - x, b - a), (x - 2.5, a - 2.5), (2.5 - x, 2.5 - a),
        (x * b, a * b), (b * x, b * a), (x * 3, a * 3), (3 * x, 3 * a),
        (x / b, a / b), (b / x, b / a), (x / 4.0, a / 4.0), (4.0 / x, 4.0 / a),
        (-x, -a), (x @ b.T, a @ b.T), (b.T @ x, b.T @ a), (x + x, a + a),
    ]  # fmt: skip
    for got, want in cases:
        assert isinstance(got, fc.Tensor)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-15, atol=0)
    # a Python number takes the Tensor's dtype
    x32 = fc.Tensor(a.astype(np.float32))
    for t in (x32 + 1.5, 1.5 * x32, 2 / x32, x32 - np.float64(1.0), -x32):
        assert t.dtype == np.float32


def test_arithmetic_gradients_both_sides() -> None:
    x = leaf(2, 3)
    b = rnd(2, 3, seed=1) + 3.0
    (2.0 * x + b / x - x * b - 1.0 / x + (-x)).sum().backward()
    a = x.numpy()
    np.testing.assert_allclose(x.grad, 2.0 - b / a**2 - b + 1.0 / a**2 - 1.0, rtol=1e-13)


# --------------------------------------------------------------------------- the tape


def test_leaf_gradients_accumulate_over_two_backward_calls() -> None:
    x = leaf(3)
    w = rnd(3, seed=1)
    (x * w).sum().backward()
    np.testing.assert_array_equal(x.grad, w)
    (x * w).sum().backward()
    np.testing.assert_array_equal(x.grad, 2 * w)
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, 2 * w + 3.0)


def test_backward_on_a_leaf() -> None:
    x = fc.Tensor(np.array(2.0), requires_grad=True)
    x.backward()
    assert x.grad == 1.0
    x.backward()
    assert x.grad == 2.0


@pytest.mark.parametrize(
    "f, df",
    [
        (lambda x: x * x, lambda a: 2 * a),
        (lambda x: x + x, lambda a: 2 + 0 * a),
        (lambda x: x - x, lambda a: 0 * a),
        (lambda x: x * x * x, lambda a: 3 * a**2),
        (lambda x: x / (x * x + 1.0), lambda a: (1 - a**2) / (a**2 + 1) ** 2),
        (lambda x: (x + 1.0) * (x - 1.0) + x, lambda a: 2 * a + 1),  # diamond
        (lambda x: fc.cat([x, x], 0).sum(0) * x, lambda a: 4 * a.sum() + 0 * a),
        (lambda x: x[:2] * x[1:], lambda a: np.array([a[1], a[0] + a[2], a[1]])),
        (
            lambda x: F.relu(x) + F.tanh(x) * x,
            lambda a: (a > 0) + np.tanh(a) + a * (1 - np.tanh(a) ** 2),
        ),
    ],
)
def test_fan_out_gets_the_summed_gradient(f, df) -> None:
    x = leaf(3, seed=4)
    f(x).sum().backward()
    np.testing.assert_allclose(x.grad, df(x.numpy()), rtol=1e-12, atol=1e-15)


def test_diamond_of_intermediates() -> None:
    x = leaf(4, seed=2)
    h = x * 3.0
    a, b = h + 1.0, h * h
    y = (a * b + a + b).sum()
    y.backward()
    xa = x.numpy()
    ha = 3 * xa
    # y = (h + 1) h^2 + h + 1 + h^2: dy/dh = 3h^2 + 2h + 1 + 2h
    np.testing.assert_allclose(x.grad, 3 * (3 * ha**2 + 4 * ha + 1), rtol=1e-12)


def test_two_leaves_given_the_same_gradient_are_not_aliased() -> None:
    a, b = leaf(2, 3, seed=1), leaf(2, 3, seed=2)
    (a + b).sum().backward()
    assert not np.shares_memory(a.grad, b.grad)
    a.grad += 1.0
    np.testing.assert_array_equal(b.grad, np.ones((2, 3)))
    b.grad *= 5.0
    np.testing.assert_array_equal(a.grad, 2 * np.ones((2, 3)))


def test_two_leaves_given_one_gradient_through_reshapes_are_not_aliased() -> None:
    # both reshape nodes receive the one gradient array of the add; their views of it must
    # not become two leaves' .grad
    x, y = leaf(2, 3, seed=1), leaf(3, 2, seed=2)
    (x.reshape(6) + y.reshape(6)).sum().backward()
    assert not np.shares_memory(x.grad, y.grad)
    x.grad += 1.0
    np.testing.assert_array_equal(y.grad, np.ones((3, 2)))


def test_a_leaf_and_an_intermediate_sharing_a_gradient() -> None:
    x, a = leaf(3, seed=1), leaf(3, seed=2)
    h = x * 2.0
    (a + h + h).sum().backward()  # add passes one array to a and to the pending h
    np.testing.assert_array_equal(a.grad, np.ones(3))
    np.testing.assert_array_equal(x.grad, 4 * np.ones(3))


def test_accumulation_does_not_write_into_the_given_gradient() -> None:
    a, b = leaf(3, seed=1), leaf(3, seed=2)
    v = np.arange(3.0)
    (a + b).backward(v)
    (a + b).backward(v)
    np.testing.assert_array_equal(v, np.arange(3.0))
    np.testing.assert_array_equal(a.grad, 2 * v)


def test_the_given_gradient_array_does_not_become_a_grad() -> None:
    # in-place work on .grad (clipping, scaling) must not reach the caller's array
    a, b = leaf(3, seed=1), leaf(3, seed=2)
    v = np.arange(3.0)
    (a + b).backward(v)
    a.grad *= 0.5
    b.grad *= 0.5
    np.testing.assert_array_equal(v, np.arange(3.0))
    x, g = leaf(3), np.ones(3)
    x.backward(g)
    x.grad += 1.0
    np.testing.assert_array_equal(g, np.ones(3))


def test_loss_gradient_is_not_aliased_with_the_retained_graph() -> None:
    # the loss kernels hand back the gradient they computed in the forward pass: the leaf's
    # .grad must not be that very array, or resetting .grad in place corrupts a retained graph
    for loss_of in (
        lambda z: F.cross_entropy(z, np.array([0, 2, 1])),
        lambda z: F.mse_loss(z, fc.Tensor(np.zeros((3, 4)))),
    ):
        z = leaf(3, 4, seed=3)
        loss = loss_of(z)
        loss.backward(retain_graph=True)
        first = z.grad.copy()
        z.grad[...] = 0.0  # zero_grad(set_to_none=False) done in place, as PyTorch allows
        loss.backward()
        np.testing.assert_array_equal(z.grad, first)


def test_backward_of_a_non_scalar_needs_a_gradient() -> None:
    y = leaf(2, 3) * 2.0
    with pytest.raises(ValueError, match=r"non-scalar.*\(2, 3\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        y.backward(np.ones(3))
    with pytest.raises(ValueError, match="dtype"):
        y.backward(np.ones((2, 3), np.float32))
    y.backward(np.ones((2, 3)))  # a one-element Tensor of any shape needs none
    z = leaf(1, 1) * 2.0
    z.backward()
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        fc.Tensor(np.ones(1)).backward()


def test_second_backward_through_a_freed_graph() -> None:
    x = leaf(3)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="freed"):
        y.backward()


def test_retain_graph_allows_a_second_backward() -> None:
    x = leaf(3)
    y = (F.tanh(x) * x).sum()
    y.backward(retain_graph=True)
    g = x.grad.copy()
    y.backward(retain_graph=True)
    np.testing.assert_allclose(x.grad, 2 * g, rtol=1e-15)
    y.backward()
    np.testing.assert_allclose(x.grad, 3 * g, rtol=1e-15)
    with pytest.raises(RuntimeError, match="freed"):
        y.backward()


def test_a_shared_subgraph_freed_by_one_loss() -> None:
    x = leaf(3)
    h = x * 2.0
    h.sum().backward()
    with pytest.raises(RuntimeError, match="freed"):
        (h * 3.0).sum().backward()


def test_no_grad_records_nothing_and_is_restored() -> None:
    x = leaf(3)
    assert is_grad_enabled()
    with fc.no_grad():
        y = x * 2.0 + 1.0
        z = F.conv2d(fc.Tensor(rnd(1, 1, 3, 3)), fc.Parameter(rnd(1, 1, 2, 2)))
    for t in (y, z):
        assert not t.requires_grad and t.grad_fn is None and t.is_leaf
    assert (x * 2.0).grad_fn == "mul"
    with pytest.raises(ValueError, match="broadcast"):
        with fc.no_grad():
            x + fc.Tensor(np.ones(4))  # an op that fails inside the block
    assert is_grad_enabled() and (x * 2.0).requires_grad
    with fc.no_grad():
        with fc.enable_grad():
            assert (x * 2.0).grad_fn == "mul"
        assert (x * 2.0).grad_fn is None
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        y.sum().backward()


def test_detach_cuts_the_graph() -> None:
    x = leaf(3)
    y = x * 2.0
    z = (y.detach() * x).sum()
    z.backward()
    np.testing.assert_array_equal(x.grad, 2 * x.numpy())  # d/dx (const * x), const = 2x
    assert y.detach().grad_fn is None


def test_requires_grad_rules() -> None:
    with pytest.raises(TypeError, match="int64"):
        fc.Tensor(np.arange(3)).requires_grad_()
    with pytest.raises(TypeError, match="float32/float64"):
        fc.Tensor(np.arange(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="detach"):
        (leaf(3) * 2.0).requires_grad_(False)
    x = leaf(3)
    assert x.requires_grad_(False) is x and not x.requires_grad
    assert (x * 2.0).grad_fn is None  # nothing to record


def test_inputs_without_grad_get_none() -> None:
    x, c = leaf(3), fc.Tensor(rnd(3, seed=1))
    (x * c).sum().backward()
    assert c.grad is None and x.grad is not None


# --------------------------------------------------------------------------- errors


def test_mismatched_dtypes() -> None:
    a, b = leaf(2, 3), fc.Tensor(rnd(2, 3, dtype=np.float32))
    for f, name in ((lambda: a + b, "add"), (lambda: a * b, "mul"), (lambda: b - a, "sub"),
                    (lambda: a / b, "div"), (lambda: a @ b.T, "matmul")):  # fmt: skip
        with pytest.raises(TypeError, match=name) as e:
            f()
        assert "float32" in str(e.value) and "float64" in str(e.value)
    with pytest.raises(TypeError, match=r"add.*float64.*float32"):
        a + rnd(2, 3, dtype=np.float32)


def test_shapes_that_do_not_broadcast() -> None:
    with pytest.raises(ValueError, match=r"add.*\(2, 3\).*\(4, 3\)"):
        leaf(2, 3) + fc.Tensor(rnd(4, 3))
    with pytest.raises(ValueError, match=r"mul.*\(2, 3\).*\(2,\)"):
        leaf(2, 3) * rnd(2)


def test_cat_errors() -> None:
    with pytest.raises(ValueError, match=r"cat.*\(2, 3\).*\(2, 4\)"):
        F.cat([leaf(2, 3), leaf(2, 4)], 0)
    with pytest.raises(ValueError, match="cat"):
        F.cat([leaf(2, 3), leaf(2, 3, 1)], 0)
    with pytest.raises((ValueError, IndexError), match="cat"):
        F.cat([leaf(2, 3), leaf(2, 3)], 2)


def test_getitem_errors() -> None:
    x = leaf(2, 3)
    for index in ([0, 1], np.array([0, 1]), np.array([True, False]), (slice(None), [0])):
        with pytest.raises(TypeError, match="basic indexing"):
            x[index]
    with pytest.raises(IndexError, match="out of range"):
        x[2]
    with pytest.raises(IndexError, match="out of range"):
        x[:, -4]
    with pytest.raises(IndexError):
        x[0, 0, 0]


# --------------------------------------------------------------------------- whole models


def _model() -> fc.Module:
    return fc.Sequential(
        fc.Conv2d(2, 4, 3, padding=1, rng=1),
        fc.BatchNorm2d(4),
        fc.ReLU(),
        fc.MaxPool2d(2),
        fc.Conv2d(4, 6, 3, rng=2),
        fc.ReLU(),
        fc.Flatten(),
        fc.Linear(6 * 2 * 3, 5, rng=3),
        fc.ReLU(),
        fc.Linear(5, 3, rng=4),
    )


def _step(model: fc.Module, x: np.ndarray, labels: np.ndarray):
    loss = fc.CrossEntropyLoss()(model(x), labels)
    loss.backward()
    return float(loss), [np.array(p.grad) for p in model.parameters()]


def test_a_training_step_is_bit_identical_run_to_run() -> None:
    x = rnd(3, 2, 9, 11, dtype=np.float32, seed=5)  # a geometry of its own (tuned on first use)
    labels = np.array([0, 2, 1])
    base = _model()
    runs = [_step(copy.deepcopy(base), x, labels) for _ in range(3)]
    runs.append(_step(_model(), x, labels))
    for loss, grads in runs[1:]:
        assert loss == runs[0][0]
        assert len(grads) == len(runs[0][1])
        for g, g0 in zip(grads, runs[0][1]):
            assert g.dtype == np.float32 and np.array_equal(g, g0)


def test_deep_chain_does_not_hit_the_recursion_limit() -> None:
    x = leaf(2)
    y = x
    for _ in range(3000):
        y = y + 1.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, np.ones(2))
    z = x
    for _ in range(3000):
        z = z * 1.0 + z * 0.0  # fan-out at every level
    z.sum().backward()
    np.testing.assert_array_equal(x.grad, 2 * np.ones(2))


def test_frozen_parameters_get_no_gradient_and_no_kernel_work(monkeypatch) -> None:
    conv1 = fc.Conv2d(2, 3, 3, padding=1, rng=1)
    conv2 = fc.Conv2d(3, 4, 3, rng=2)
    conv2.weight.requires_grad_(False)
    conv1.requires_grad_(False)
    calls = []
    real = ops.KERNELS[("conv2d", "cpu")]

    def spy(m, gy, ctx, needs):
        out = real.backward(m, gy, ctx, needs)
        calls.append((tuple(needs), tuple(o is None for o in out)))
        return out

    monkeypatch.setitem(ops.KERNELS, ("conv2d", "cpu"), ops.Kernel(real.forward, spy))
    x = fc.Tensor(rnd(2, 2, 6, 6, dtype=np.float32))
    with fc.using(backend="cpu"):
        h = conv1(x)
        assert h.grad_fn is None  # nothing below requires a gradient: not recorded
        y = conv2(F.relu(h) + fc.Tensor(np.zeros((1, 3, 1, 1), np.float32), requires_grad=True))
        y.sum().backward()
    assert conv1.weight.grad is None and conv1.bias.grad is None
    assert conv2.weight.grad is None and conv2.bias.grad is not None
    # conv2 ran its backward once, asked for grad_x and grad_b only, and skipped grad_w
    assert calls == [((True, False, True), (False, True, False))]


def test_frozen_module_inside_a_model() -> None:
    model = _model()
    model[0].requires_grad_(False)
    _step(model, rnd(2, 2, 9, 11, dtype=np.float32), np.array([0, 1]))
    for name, p in model.named_parameters():
        assert (p.grad is None) == name.startswith("0."), name


def test_backward_never_mistakes_a_new_array_for_a_freed_one():
    """The pass's sets of memories key on id(), which CPython hands to the next object made once
    one is freed: a fresh gradient must not pass for a freed one (that copied it needlessly, or
    would let an addition write in place into memory the pass did not make)."""
    from fastconv.tensor import _Buffers

    bufs, collided = _Buffers(), False
    for _ in range(10_000):
        a = np.empty(64, np.float32)
        bufs.add(a)
        old = id(a)
        del a
        b = np.empty(64, np.float32)
        assert b not in bufs
        if id(b) == old:
            collided = True
            break
    assert collided, "no id was reused: the case was not exercised"
    bufs.add(b)
    assert b.reshape(8, 8) in bufs and b[3:] in bufs  # views share their base's memory
    bufs.discard(b[1:])
    assert b not in bufs


def test_leaf_gradients_are_the_kernels_arrays_not_copies():
    """Training steps hand each parameter the array its kernel made (no copy on the way: a
    freed gradient's id reused by a fresh one made a copy of it), and the gradients still match
    the chain rule in NumPy."""
    rng = np.random.default_rng(3)
    model = fc.Sequential(fc.Linear(12, 9), fc.ReLU(), fc.Linear(9, 5)).to(np.float64)
    opt = fc.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, labels = rng.standard_normal((4, 12)), np.zeros(4, int)
    copies = []
    real = fc._device.copy

    def counting(a):
        copies.append(a.shape)
        return real(a)

    fc._device.copy = counting
    try:
        for i in range(50):  # many steps: ids of freed gradients get reused
            if i:
                opt.step()
            opt.zero_grad()
            fc.losses.CrossEntropyLoss()(model(fc.Tensor(x)), labels).backward()
    finally:
        fc._device.copy = real
    assert copies == []
    w1, b1, w2 = model[0].weight.data, model[0].bias.data, model[2].weight.data
    h = x @ w1.T + b1
    z = np.maximum(h, 0) @ w2.T + model[2].bias.data
    p = np.exp(z - z.max(1, keepdims=True))
    gz = (p / p.sum(1, keepdims=True) - np.eye(5)[labels]) / 4  # the mean over 4 rows
    gh = gz @ w2 * (h > 0)
    np.testing.assert_allclose(model[0].weight.grad, gh.T @ x, rtol=1e-10)
    np.testing.assert_allclose(model[2].weight.grad, gz.T @ np.maximum(h, 0), rtol=1e-10)
