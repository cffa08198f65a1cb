"""fc.Module: registration, traversal, state dicts (and their trip to and from torch), modes,
freezing, apply, repr, forward hooks, Sequential's fusion plan, layers and losses against
torch."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import functional as F
from fastconv.nn import plan_fusions
from tests.helpers import assert_close


def rnd(*shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


class Block(fc.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = fc.Conv2d(c, c, 3, padding=1, bias=False, rng=1)
        self.bn1 = fc.BatchNorm2d(c)
        self.scale = 2.0  # a plain attribute: not registered

    def forward(self, x):
        return fc.relu(self.bn1(self.conv1(x)))


class Net(fc.Module):
    """A user-written Module with a nested Sequential, a custom block and a ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = fc.Sequential(fc.Conv2d(1, 4, 3, padding=1, rng=2), fc.ReLU(), fc.MaxPool2d(2))
        self.block = Block(4)
        self.heads = fc.ModuleList([fc.Linear(16, 10, rng=3), fc.Linear(16, 2, bias=False, rng=4)])
        self.drop = fc.Dropout(0.25)

    def forward(self, x):
        h = self.block(self.stem(x)).flatten(1)
        return self.heads[0](h) + fc.functional.sum(self.heads[1](h), 1, True)


X = rnd(2, 1, 4, 4, seed=9)  # Net's input


# --------------------------------------------------------------------------- registration


def test_attribute_registration() -> None:
    class M(fc.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = fc.Parameter(np.zeros(3, np.float32))
            self.lin = fc.Linear(2, 3)
            self.k = 3
            self.arr = np.zeros(2)
            self.t = fc.Tensor(np.zeros(2))  # a plain Tensor is state, not a parameter

    m = M()
    assert list(m._parameters) == ["w"] and list(m._modules) == ["lin"]
    assert [n for n, _ in m.named_parameters()] == ["w", "lin.weight", "lin.bias"]
    assert list(m.state_dict()) == ["w", "lin.weight", "lin.bias"]
    assert m.k == 3 and isinstance(m.arr, np.ndarray) and isinstance(m.t, fc.Tensor)
    assert m.w is m._parameters["w"] and m.lin is m._modules["lin"]

    m.lin = None  # a module slot takes None and drops out of every traversal
    assert m.lin is None and list(m.children()) == []
    assert [n for n, _ in m.named_parameters()] == ["w"]
    m.w = None
    assert m.w is None and m.parameters() == [] and m.state_dict() == {}
    with pytest.raises(TypeError, match="Parameter"):
        m.w = np.zeros(3)
    with pytest.raises(TypeError, match="Module"):
        m.lin = 5
    m.lin = fc.Linear(1, 1)  # back to a module
    m.k = fc.ReLU()  # a plain attribute becomes a registered module
    assert [n for n, _ in m.named_children()] == ["lin", "k"] and "k" not in m.__dict__
    m.lin = fc.Parameter(np.ones(1, np.float32))  # a module slot now holds a parameter
    assert "lin" not in m._modules and m._parameters["lin"] is m.lin
    del m.k
    assert [n for n, _ in m.named_children()] == []
    with pytest.raises(AttributeError, match="nope"):
        _ = m.nope


def test_assignment_before_init_is_an_error() -> None:
    class Bad(fc.Module):
        def __init__(self) -> None:
            self.lin = fc.Linear(1, 1)
            super().__init__()

    with pytest.raises(AttributeError, match="super"):
        Bad()


def test_traversal_order_and_prefixes() -> None:
    n = Net()
    assert [k for k, _ in n.named_children()] == ["stem", "block", "heads", "drop"]
    assert [k for k, _ in n.named_modules()] == [
        "",
        "stem",
        "stem.0",
        "stem.1",
        "stem.2",
        "block",
        "block.conv1",
        "block.bn1",
        "heads",
        "heads.0",
        "heads.1",
        "drop",
    ]
    assert [k for k, _ in n.named_parameters()] == [
        "stem.0.weight",
        "stem.0.bias",
        "block.conv1.weight",
        "block.bn1.weight",
        "block.bn1.bias",
        "heads.0.weight",
        "heads.0.bias",
        "heads.1.weight",
    ]
    assert [k for k, _ in n.named_parameters(prefix="net")][0] == "net.stem.0.weight"
    assert [k for k, _ in n.named_buffers()] == [
        "block.bn1.running_mean",
        "block.bn1.running_var",
        "block.bn1.num_batches_tracked",
    ]
    assert n.parameters()[0] is n.stem[0].weight
    assert len(list(n.modules())) == 12


def test_shared_modules_and_parameters_are_listed_once() -> None:
    lin = fc.Linear(2, 2)
    m = fc.Sequential(lin, fc.ReLU(), lin)
    assert [k for k, _ in m.named_modules()] == ["", "0", "1"]
    assert [k for k, _ in m.named_parameters()] == ["0.weight", "0.bias"]


def test_nested_state_dict_keys() -> None:
    sd = Net().state_dict()
    assert list(sd) == [
        "stem.0.weight",
        "stem.0.bias",
        "block.conv1.weight",
        "block.bn1.weight",
        "block.bn1.bias",
        "block.bn1.running_mean",
        "block.bn1.running_var",
        "block.bn1.num_batches_tracked",
        "heads.0.weight",
        "heads.0.bias",
        "heads.1.weight",
    ]
    assert sd["block.bn1.num_batches_tracked"].dtype == np.int64
    assert sd["block.bn1.num_batches_tracked"].shape == ()
    assert sd["stem.0.weight"].shape == (4, 1, 3, 3) and sd["stem.0.weight"].dtype == np.float32


def test_state_dict_holds_copies() -> None:
    n = Net()
    sd = n.state_dict()
    sd["stem.0.weight"][...] = 7.0
    sd["block.bn1.running_mean"][...] = 7.0
    assert not np.any(n.stem[0].weight.numpy() == 7.0)
    assert not np.any(n.block.bn1.running_mean == 7.0)


# --------------------------------------------------------------------------- load_state_dict


def test_load_state_dict_round_trip_and_cast() -> None:
    a, b = Net(), Net()
    sd = {k: v * 0 + i for i, (k, v) in enumerate(a.state_dict().items())}
    sd64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in sd.items()}
    b.load_state_dict(sd64)
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
        assert v.dtype == sd[k].dtype, k  # cast to the model's dtype
    b.load_state_dict({k: fc.Tensor(v) for k, v in a.state_dict().items() if v.dtype.kind == "f"}
                      | {"block.bn1.num_batches_tracked": np.array(3)})  # fmt: skip
    assert int(b.block.bn1.num_batches_tracked) == 3
    np.testing.assert_array_equal(b.stem[0].weight.numpy(), a.stem[0].weight.numpy())


def test_load_state_dict_keeps_0d_buffers() -> None:
    bn = fc.BatchNorm2d(2)
    bn.load_state_dict(fc.BatchNorm2d(2).state_dict())
    assert bn.num_batches_tracked.shape == ()
    bn.load_state_dict(bn.state_dict())  # and it loads again
    assert bn.state_dict()["num_batches_tracked"].shape == ()


def test_load_state_dict_strict_errors_change_nothing() -> None:
    n = Net()
    before = n.state_dict()
    good = {k: np.full_like(v, 5) for k, v in before.items()}

    missing = dict(good)
    del missing["heads.1.weight"]
    with pytest.raises(KeyError, match=r"missing keys \['heads\.1\.weight'\]"):
        n.load_state_dict(missing)
    unexpected = dict(good, **{"heads.2.weight": np.zeros((2, 16), np.float32)})
    with pytest.raises(KeyError, match=r"unexpected keys \['heads\.2\.weight'\]"):
        n.load_state_dict(unexpected)
    wrong = dict(good, **{"heads.1.weight": np.zeros((3, 16), np.float32)})
    with pytest.raises(ValueError, match=r"heads\.1\.weight.*\(3, 16\).*\(2, 16\)"):
        n.load_state_dict(wrong)
    for k, v in n.state_dict().items():  # every failure left the model as it was
        np.testing.assert_array_equal(v, before[k], err_msg=k)

    n.load_state_dict(missing | {"extra": np.zeros(1)}, strict=False)
    after = n.state_dict()
    assert np.all(after["stem.0.weight"] == 5)
    np.testing.assert_array_equal(after["heads.1.weight"], before["heads.1.weight"])


# --------------------------------------------------------------------------- the trip to torch


def _torch_net(torch):
    nn = torch.nn

    class TBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(self.bn1(self.conv1(x)))

    class TNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.block = TBlock(4)
            self.heads = nn.ModuleList([nn.Linear(16, 10), nn.Linear(16, 2, bias=False)])
            self.drop = nn.Dropout(0.25)

        def forward(self, x):
            h = self.block(self.stem(x)).flatten(1)
            return self.heads[0](h) + self.heads[1](h).sum(1, keepdim=True)

    return TNet()


def _train_a_little(net: fc.Module) -> None:
    net.train()
    for s in range(2):
        net(rnd(3, 1, 4, 4, seed=s))  # moves the BatchNorm running statistics


def test_state_dict_moves_both_ways_with_torch() -> None:
    torch = pytest.importorskip("torch")
    ours, theirs = Net(), _torch_net(torch)
    _train_a_little(ours)
    assert list(ours.state_dict()) == list(theirs.state_dict())

    # fastconv -> torch
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    ours.eval(), theirs.eval()
    with torch.no_grad():
        want = theirs(torch.from_numpy(X)).numpy()
    assert_close(ours(X).numpy(), want, np.float32, "fastconv -> torch logits")
    assert int(theirs.block.bn1.num_batches_tracked) == 2

    # torch -> fastconv, into a fresh model
    with torch.no_grad():
        for p in theirs.parameters():
            p.mul_(0.5)
        theirs.block.bn1.running_var.add_(0.25)
    fresh = Net()
    fresh.load_state_dict(theirs.state_dict())
    fresh.eval()
    with torch.no_grad():
        want = theirs(torch.from_numpy(X)).numpy()
    assert_close(fresh(X).numpy(), want, np.float32, "torch -> fastconv logits")
    for k, v in theirs.state_dict().items():
        got = fresh.state_dict()[k]
        assert got.shape == tuple(v.shape) and got.dtype == v.numpy().dtype, k
        assert np.array_equal(got, v.numpy()), k
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in fresh.state_dict().items()})


def test_training_step_gradients_match_torch() -> None:
    torch = pytest.importorskip("torch")
    ours, theirs = Net(), _torch_net(torch)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    labels = np.array([1, 7])
    loss = fc.CrossEntropyLoss()(ours(X), labels)
    loss.backward()
    tloss = torch.nn.CrossEntropyLoss()(theirs(torch.from_numpy(X)), torch.from_numpy(labels))
    tloss.backward()
    assert abs(float(loss) - tloss.item()) <= 1e-5 * max(1.0, abs(tloss.item()))
    tgrads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, tgrads[name].grad.numpy(), np.float32, name)
    for k in ("running_mean", "running_var"):
        assert_close(
            getattr(ours.block.bn1, k), getattr(theirs.block.bn1, k).numpy(), np.float32, k
        )


# --------------------------------------------------------------------------- modes and grads


def test_train_eval_recurse() -> None:
    n = Net()
    assert all(m.training for m in n.modules())
    assert n.eval() is n
    assert not any(m.training for m in n.modules())
    n.block.train()
    assert n.block.bn1.training and not n.stem.training
    assert n.train() is n and all(m.training for m in n.modules())
    n.train(False)
    assert not n.heads[1].training


def test_zero_grad() -> None:
    n = Net()
    fc.MSELoss()(n(X), np.zeros((2, 10), np.float32)).backward()
    assert all(p.grad is not None for p in n.parameters())
    n.zero_grad(set_to_none=False)
    for p in n.parameters():
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype and not np.any(p.grad)
    n.zero_grad()
    assert all(p.grad is None for p in n.parameters())


def test_requires_grad_false_freezes() -> None:
    n = Net()
    assert n.block.requires_grad_(False) is n.block
    assert [k for k, p in n.named_parameters() if not p.requires_grad] == [
        "block.conv1.weight",
        "block.bn1.weight",
        "block.bn1.bias",
    ]
    fc.MSELoss()(n(X), np.zeros((2, 10), np.float32)).backward()
    for k, p in n.named_parameters():
        assert (p.grad is None) == k.startswith("block."), k
    n.requires_grad_(False)
    out = n(X)
    assert not out.requires_grad and out.grad_fn is None
    n.requires_grad_()
    assert all(p.requires_grad for p in n.parameters())


def test_optimizer_skips_a_frozen_parameter() -> None:
    n = Net()
    n.stem[0].weight.requires_grad_(False)
    opt = fc.optim.SGD(n.parameters(), lr=0.1, momentum=0.9)
    before = {k: v.copy() for k, v in n.state_dict().items()}
    fc.MSELoss()(n(X), np.ones((2, 10), np.float32)).backward()
    opt.step()
    after = n.state_dict()
    np.testing.assert_array_equal(after["stem.0.weight"], before["stem.0.weight"])
    assert not np.array_equal(after["stem.0.bias"], before["stem.0.bias"])
    assert not np.array_equal(after["heads.1.weight"], before["heads.1.weight"])
    assert "momentum_buffer" not in opt.state[0] and "momentum_buffer" in opt.state[1]


def test_apply_visits_children_first() -> None:
    n = Net()
    names = {id(m): k for k, m in n.named_modules()}
    seen = []
    assert n.apply(lambda m: seen.append(names[id(m)])) is n
    assert seen == [
        "stem.0",
        "stem.1",
        "stem.2",
        "stem",
        "block.conv1",
        "block.bn1",
        "block",
        "heads.0",
        "heads.1",
        "heads",
        "drop",
        "",
    ]


def test_repr_of_a_nested_custom_module() -> None:
    lines = repr(Net()).splitlines()
    assert lines[0] == "Net("
    assert lines[1] == "  (stem): Sequential("
    assert lines[2] == "    (0): Conv2d(1, 4, kernel_size=3, padding=1)"
    assert lines[3] == "    (1): ReLU()"
    assert lines[4] == "    (2): MaxPool2d(kernel_size=2)"
    assert lines[5] == "  )"
    assert lines[6] == "  (block): Block("
    assert lines[7] == "    (conv1): Conv2d(4, 4, kernel_size=3, padding=1, bias=False)"
    assert lines[8] == "    (bn1): BatchNorm2d(4)"
    assert "    (1): Linear(in_features=16, out_features=2, bias=False)" in lines
    assert lines[-2:] == ["  (drop): Dropout(p=0.25)", ")"]
    assert repr(fc.Identity()) == "Identity()"
    assert repr(fc.CrossEntropyLoss(label_smoothing=0.1)) == "CrossEntropyLoss(label_smoothing=0.1)"


# --------------------------------------------------------------------------- hooks and fusion


def test_forward_hook_sees_inputs_and_output_and_can_replace_it() -> None:
    lin = fc.Linear(3, 2, rng=0)
    seen = []

    def hook(module, inputs, output):
        seen.append((module, inputs, output))

    handle = lin.register_forward_hook(hook)
    x = rnd(4, 3)
    out = lin(x)
    ((m, inputs, output),) = seen
    assert m is lin and isinstance(inputs, tuple) and len(inputs) == 1
    np.testing.assert_array_equal(np.asarray(inputs[0]), x)
    assert output is out

    h2 = lin.register_forward_hook(lambda m, i, o: o * 0.0)
    assert not np.any(lin(x).numpy())
    h2.remove()
    handle.remove()
    handle.remove()  # twice is harmless
    out = lin(x)
    assert np.any(out.numpy()) and len(seen) == 2  # the first hook ran once more, then none


def planned(seq: fc.Sequential) -> list[tuple[int, bool]]:
    """Sequential's plan as (run length, fused?) per run."""
    return [(len(run), call is not None) for run, call in seq._plan]


def _conv_relu(pool=None):
    layers = [fc.Conv2d(2, 3, 3, padding=1, rng=0), fc.ReLU()]
    return fc.Sequential(*layers, *([pool] if pool is not None else []))


def test_sequential_fuses_without_hooks() -> None:
    x = rnd(2, 2, 6, 6)
    assert _conv_relu()(x).grad_fn == "conv2d_relu"
    assert _conv_relu(fc.MaxPool2d(2))(x).grad_fn == "conv2d_relu_maxpool"
    assert _conv_relu(fc.MaxPool2d(2, stride=1))(x).grad_fn == "max_pool2d"
    assert _conv_relu(fc.MaxPool2d(2, padding=1))(x).grad_fn == "max_pool2d"
    seq = fc.Sequential(fc.Flatten(), fc.Linear(72, 4), fc.ReLU(), fc.Linear(4, 2), fc.ReLU())
    assert [(a, b, c is not None) for a, b, c in plan_fusions(list(seq))] == [
        (0, 1, False),
        (1, 3, True),
        (3, 5, True),
    ]
    assert planned(seq) == [(1, False), (2, True), (2, True)]
    assert seq(x).grad_fn == "linear_relu"


def test_fused_and_unfused_give_the_same_results() -> None:
    x = rnd(2, 2, 6, 6, dtype=np.float64)
    fused = fc.Sequential(fc.Conv2d(2, 3, 3, padding=1, dtype=np.float64, rng=0), fc.ReLU(),
                          fc.MaxPool2d(2))  # fmt: skip
    a = fused(x)
    b = fused[2](fused[1](fused[0](x)))  # the same layers called one by one
    assert a.grad_fn == "conv2d_relu_maxpool" and b.grad_fn == "max_pool2d"
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)
    v = rnd(*a.shape, dtype=np.float64, seed=1)
    a.backward(v)
    g = [p.grad.copy() for p in fused.parameters()]
    fused.zero_grad()
    b.backward(v)
    for ga, gb in zip(g, [p.grad for p in fused.parameters()]):
        np.testing.assert_allclose(ga, gb, rtol=1e-12, atol=1e-12)


def test_a_hook_on_relu_stops_fusion_and_sees_the_relu_output() -> None:
    seq = _conv_relu(fc.MaxPool2d(2))
    seen = []
    handle = seq[1].register_forward_hook(lambda m, i, o: seen.append(o.numpy().copy()))
    x = rnd(2, 2, 6, 6)
    out = seq(x)
    assert out.grad_fn == "max_pool2d" and len(seen) == 1
    assert seen[0].shape == (2, 3, 6, 6) and np.all(seen[0] >= 0)
    np.testing.assert_allclose(seen[0], np.maximum(F.conv2d(x, seq[0].weight.numpy(),
                                                            seq[0].bias.numpy(), padding=1), 0),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(out.numpy(), F.max_pool2d(seen[0], 2), rtol=1e-6)
    handle.remove()
    assert seq(x).grad_fn == "conv2d_relu_maxpool" and len(seen) == 1
    seq[0].register_forward_hook(lambda m, i, o: None)  # a hook on the conv stops it too
    assert seq(x).grad_fn == "max_pool2d"


@pytest.mark.parametrize("training", [True, False])
def test_sequential_fuses_batch_norm_relu_bit_for_bit(training) -> None:
    """BatchNorm2d + ReLU run as batch_norm2d_relu, with the same output, running statistics
    and gradients (bits) as the two layers called one by one; a hook on either stops it."""
    x = rnd(3, 2, 5, 5)
    seq = fc.Sequential(fc.Conv2d(2, 4, 3, padding=1, rng=0), fc.BatchNorm2d(4), fc.ReLU())
    seq[1].weight.data = rnd(4, seed=2)
    seq[1].bias.data = rnd(4, seed=3)
    seq.train(training)
    assert planned(seq) == [(1, False), (2, True)]
    before = {k: v.copy() for k, v in seq.state_dict().items()}
    a = seq(x)
    assert a.grad_fn == "batch_norm2d_relu"
    after_fused = {k: v.copy() for k, v in seq.state_dict().items()}
    seq.load_state_dict(before)
    b = seq[2](seq[1](seq[0](x)))
    assert b.grad_fn == "relu"
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    for k, v in seq.state_dict().items():
        np.testing.assert_array_equal(v, after_fused[k], err_msg=k)
    v = rnd(*a.shape, seed=1)
    a.backward(v)
    g = [p.grad.copy() for p in seq.parameters()]
    seq.zero_grad()
    b.backward(v)
    for ga, gb in zip(g, [p.grad for p in seq.parameters()], strict=True):
        np.testing.assert_array_equal(ga, gb)
    seen = []
    seq[1].register_forward_hook(lambda m, i, o: seen.append(o.numpy().copy()))
    assert seq(x).grad_fn == "relu" and len(seen) == 1 and (seen[0] < 0).any()


def test_bn_relu_helper_fuses_plain_batch_norm_only() -> None:
    from fastconv.nn import bn_relu

    x = rnd(2, 3, 4, 4)
    bn = fc.BatchNorm2d(3)
    assert bn_relu(bn, x).grad_fn == "batch_norm2d_relu"
    bn.register_forward_hook(lambda m, i, o: None)
    assert bn_relu(bn, x).grad_fn == "relu"

    class Twice(fc.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2.0

    assert bn_relu(Twice(3), x).grad_fn == "relu"


def test_a_conv_subclass_overriding_forward_is_not_fused() -> None:
    calls = []

    class MyConv(fc.Conv2d):
        def forward(self, x):
            calls.append(1)
            return super().forward(x) * 2.0

    seq = fc.Sequential(MyConv(2, 3, 3, rng=0), fc.ReLU(), fc.MaxPool2d(2))
    assert planned(seq) == [(1, False), (1, False), (1, False)]
    assert seq(rnd(1, 2, 6, 6)).grad_fn == "max_pool2d" and calls == [1]

    class Quiet(fc.Conv2d):  # a subclass that keeps forward still fuses
        pass

    assert fc.Sequential(Quiet(2, 3, 3), fc.ReLU())(rnd(1, 2, 5, 5)).grad_fn == "conv2d_relu"


def test_sequential_edits_replan() -> None:
    x = rnd(1, 2, 6, 6)
    seq = fc.Sequential(fc.Conv2d(2, 3, 3, rng=0), fc.Identity())
    assert seq(x).grad_fn == "conv2d"
    seq[1] = fc.ReLU()
    assert planned(seq) == [(2, True)] and seq(x).grad_fn == "conv2d_relu"
    seq.append(fc.MaxPool2d(2))
    assert planned(seq) == [(3, True)] and seq(x).grad_fn == "conv2d_relu_maxpool"
    seq.insert(1, fc.Identity())
    assert [k for k, _ in seq.named_children()] == ["0", "1", "2", "3"]
    assert isinstance(seq[1], fc.Identity) and isinstance(seq[3], fc.MaxPool2d)
    assert planned(seq) == [(1, False)] * 4
    assert seq(x).grad_fn == "max_pool2d"
    assert list(seq.state_dict()) == ["0.weight", "0.bias"]
    lin = fc.Sequential(fc.Linear(3, 2))
    lin.append(fc.ReLU())
    assert lin(rnd(2, 3)).grad_fn == "linear_relu"
    assert len(seq) == 4 and [type(m).__name__ for m in seq[1:3]] == ["Identity", "ReLU"]
    assert plan_fusions([fc.ReLU(), fc.Linear(2, 2)]) == [(0, 1, None), (1, 2, None)]


def test_sequential_and_modulelist_reject_non_modules() -> None:
    with pytest.raises(TypeError, match="Module"):
        fc.Sequential(fc.ReLU(), lambda x: x)
    with pytest.raises(TypeError, match="Module"):
        fc.Sequential(fc.ReLU()).append(np.zeros(1))
    with pytest.raises(TypeError, match="Module"):
        fc.ModuleList([fc.ReLU()]).append(3)


def test_model_accepts_a_numpy_array_and_identity_passes_through() -> None:
    lin = fc.Linear(3, 2, rng=0)
    x = rnd(4, 3)
    out = lin(x)
    assert isinstance(out, fc.Tensor) and out.shape == (4, 2) and out.grad_fn == "linear"
    t = fc.Tensor(x)
    assert fc.Identity()(t) is t
    assert isinstance(fc.Identity()(x), fc.Tensor)
    with fc.no_grad():
        assert lin(x).grad_fn is None


# --------------------------------------------------------------------------- against torch


def _grad_parity(torch, ours, theirs, x, seed=3):
    """Forward values and the input gradient of one layer against torch's, float64."""
    xt = torch.from_numpy(x.copy()).requires_grad_()
    xo = fc.Tensor(x.copy(), requires_grad=True)
    y, yt = ours(xo), theirs(xt)
    assert_close(y.numpy(), yt.detach().numpy(), np.float64, "forward")
    v = np.random.default_rng(seed).standard_normal(y.shape)
    y.backward(v)
    yt.backward(torch.from_numpy(v))
    assert_close(xo.grad, xt.grad.numpy(), np.float64, "grad x")
    return y, yt


@pytest.mark.parametrize(
    "make",
    [
        lambda nn, d: (fc.ELU(0.7), nn.ELU(0.7)),
        lambda nn, d: (fc.Softmax(dim=d), nn.Softmax(dim=d)),
        lambda nn, d: (fc.LogSoftmax(dim=d), nn.LogSoftmax(dim=d)),
        lambda nn, d: (fc.AdaptiveAvgPool2d((3, 2)), nn.AdaptiveAvgPool2d((3, 2))),
        lambda nn, d: (fc.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1)),
        lambda nn, d: (fc.AdaptiveAvgPool2d((None, 4)), nn.AdaptiveAvgPool2d((None, 4))),
        lambda nn, d: (fc.Identity(), nn.Identity()),
    ],
    ids=["ELU", "Softmax", "LogSoftmax", "AdaptiveAvgPool2d-3x2", "AdaptiveAvgPool2d-1",
         "AdaptiveAvgPool2d-None", "Identity"],
)  # fmt: skip
@pytest.mark.parametrize("dim", [1, -1])
def test_layers_match_torch(make, dim) -> None:
    torch = pytest.importorskip("torch")
    ours, theirs = make(torch.nn, dim)
    _grad_parity(torch, ours, theirs, rnd(2, 3, 5, 7, dtype=np.float64))


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm1d_matches_torch(shape, affine) -> None:
    torch = pytest.importorskip("torch")
    ours = fc.BatchNorm1d(3, momentum=0.2, affine=affine, dtype=np.float64)
    theirs = torch.nn.BatchNorm1d(3, momentum=0.2, affine=affine).double()
    if affine:
        w, b = rnd(3, dtype=np.float64, seed=7), rnd(3, dtype=np.float64, seed=8)
        ours.weight.data[...], ours.bias.data[...] = w, b
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(w))
            theirs.bias.copy_(torch.from_numpy(b))
    for step in range(2):  # training: batch statistics, running statistics updated
        _grad_parity(torch, ours, theirs, rnd(*shape, dtype=np.float64, seed=step) * 2 + 1)
    if affine:
        assert_close(ours.weight.grad, theirs.weight.grad.numpy(), np.float64, "grad weight")
        assert_close(ours.bias.grad, theirs.bias.grad.numpy(), np.float64, "grad bias")
    for k, v in theirs.state_dict().items():
        if v.is_floating_point():
            assert_close(ours.state_dict()[k], v.numpy(), np.float64, k)
        else:
            assert ours.state_dict()[k] == v.item() == 2, k
    ours.eval(), theirs.eval()
    _grad_parity(torch, ours, theirs, rnd(*shape, dtype=np.float64, seed=5))


# --------------------------------------------------------------------------- loss modules


def test_loss_modules_return_0d_tensors() -> None:
    z = fc.Tensor(rnd(4, 3), requires_grad=True)
    labels = np.array([0, 2, 1, 2])
    ce = fc.CrossEntropyLoss()(z, labels)
    nll = fc.NLLLoss()(F.log_softmax(z, 1), labels)
    mse = fc.MSELoss()(z, np.zeros((4, 3), np.float32))
    for loss in (ce, nll, mse):
        assert isinstance(loss, fc.Tensor) and loss.shape == () and loss.dtype == np.float32
        assert isinstance(float(loss), float)
    assert abs(float(ce) - float(nll)) < 1e-6
    assert abs(float(mse) - float(np.mean(z.numpy() ** 2))) < 1e-6
    ref, _ = F.cross_entropy(z.numpy(), labels)
    assert abs(float(ce) - ref) < 1e-6
    (ce + mse).backward()
    assert z.grad.shape == (4, 3)
    assert fc.CrossEntropyLoss()(rnd(4, 3), labels).grad_fn is None  # arrays in: nothing to record


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_cross_entropy_loss_matches_torch(ls) -> None:
    torch = pytest.importorskip("torch")
    z, labels = rnd(5, 4, dtype=np.float64, seed=2), np.array([0, 3, 1, 1, 2])
    zo = fc.Tensor(z, requires_grad=True)
    zt = torch.from_numpy(z.copy()).requires_grad_()
    loss = fc.CrossEntropyLoss(label_smoothing=ls)(zo, labels)
    tloss = torch.nn.CrossEntropyLoss(label_smoothing=ls)(zt, torch.from_numpy(labels))
    loss.backward()
    tloss.backward()
    assert abs(float(loss) - tloss.item()) <= 1e-12
    assert_close(zo.grad, zt.grad.numpy(), np.float64, "grad logits")


def test_nll_and_mse_losses_match_torch() -> None:
    torch = pytest.importorskip("torch")
    z, labels = rnd(4, 3, dtype=np.float64, seed=1), np.array([2, 0, 1, 2])
    t = rnd(4, 3, dtype=np.float64, seed=2)
    zo, to = fc.Tensor(z, requires_grad=True), fc.Tensor(t, requires_grad=True)
    zt = torch.from_numpy(z.copy()).requires_grad_()
    tt = torch.from_numpy(t.copy()).requires_grad_()
    loss = fc.NLLLoss()(zo, labels) + fc.MSELoss()(zo, to)
    tloss = torch.nn.NLLLoss()(zt, torch.from_numpy(labels)) + torch.nn.MSELoss()(zt, tt)
    loss.backward()
    tloss.backward()
    assert abs(float(loss) - tloss.item()) <= 1e-12
    assert_close(zo.grad, zt.grad.numpy(), np.float64, "grad input")
    assert_close(to.grad, tt.grad.numpy(), np.float64, "grad target")


def test_module_traversal_order_and_sharing():
    """named_modules / modules: depth first in registration order, a shared module once, at
    the first name that reaches it (PyTorch's order), the prefix on every name."""
    shared = fc.ReLU()
    inner = fc.Sequential(fc.Linear(2, 2), shared)
    outer = fc.Sequential(inner, shared, fc.Sequential(fc.Linear(2, 1)))
    names = [n for n, _ in outer.named_modules()]
    assert names == ["", "0", "0.0", "0.1", "2", "2.0"]
    assert [n for n, _ in outer.named_modules("net")] == ["net", "net.0", "net.0.0", "net.0.1",
                                                          "net.2", "net.2.0"]
    assert list(outer.modules()) == [m for _, m in outer.named_modules()]
    outer.eval()
    assert not any(m.training for m in outer.modules())
    try:
        import torch
    except ImportError:
        return
    ts = torch.nn.ReLU()
    t = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2), ts), ts,
                            torch.nn.Sequential(torch.nn.Linear(2, 1)))
    assert [n for n, _ in t.named_modules()] == names
