"""ONNX in and out (fastconv.onnx): fastconv exports run in onnxruntime and load back; torch
exports load into fastconv; loaded models train, save and re-export; hand-built graphs
(asymmetric pads, auto_pad, Gemm flags, broadcasting, shape chains, old-opset Softmax, ...)
give onnxruntime's outputs; bad files and inputs fail with clear errors before anything runs."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fastconv as fc
from fastconv import functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import fastconv.onnx as fo  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5  # float32 rounding between two engines' summation orders


def rng(seed=0):
    return np.random.default_rng(seed)


def run_ort(path, *xs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, xs)))


def random_bn_stats(model, seed=1):
    """Running statistics away from 0/1, so BatchNormalization's use of them is checked."""
    g = rng(seed)
    for m in model.modules():
        if isinstance(m, (fc.BatchNorm2d, fc.BatchNorm1d)):
            C = m.num_features
            m.running_mean = (g.standard_normal(C) * 0.3).astype(np.float32)
            m.running_var = g.uniform(0.5, 2.0, C).astype(np.float32)
            m.weight.data = g.uniform(0.5, 1.5, C).astype(np.float32)
            m.bias.data = (g.standard_normal(C) * 0.1).astype(np.float32)
    return model


def test_import_fastconv_imports_no_onnx():
    code = (
        "import sys, fastconv as fc; assert 'onnx' not in sys.modules; "
        "assert 'fastconv.onnx' not in sys.modules; fc.onnx.export; "
        "assert 'onnx' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- export: the zoo


@pytest.mark.parametrize("name", sorted(fc.models.MODELS))
def test_zoo_export_runs_in_onnxruntime_and_loads_back(name, tmp_path):
    model = random_bn_stats(fc.models.get(name, rng=0))
    model.train()  # export evaluates in eval mode and restores the mode
    path = tmp_path / f"{name}.onnx"
    fo.export(model, rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32), path)
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()
    x = rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)  # another batch size
    want = model(x).numpy()
    np.testing.assert_allclose(run_ort(path, x)[0], want, rtol=RTOL, atol=ATOL)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    if any(isinstance(m, fc.BatchNorm2d) for m in model.modules()):
        assert "BatchNormalization" in {n.op_type for n in proto.graph.node}
    loaded = fo.load(path)
    np.testing.assert_allclose(loaded(x).numpy(), want, rtol=RTOL, atol=ATOL)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(theirs) == {k for k in ours if not k.endswith("num_batches_tracked")}
    for k, v in theirs.items():
        np.testing.assert_array_equal(v, ours[k])
    model.load_state_dict(theirs, strict=False)  # names kept: the state dict moves back


# --------------------------------------------------------------------------- export: user modules


class Zoo(fc.Module):
    """Every exportable op: residual add, concatenation, fused runs, broadcasting constants."""

    def __init__(self):
        super().__init__()
        g = 0
        self.stem = fc.Sequential(
            fc.Conv2d(3, 8, 3, padding=1, rng=g), fc.ReLU(), fc.MaxPool2d(2)
        )  # fused conv + ReLU + max-pool
        self.same = fc.Conv2d(8, 8, 4, padding="same", rng=1)  # asymmetric padding
        self.bn = fc.BatchNorm2d(8)
        self.down = fc.Conv2d(8, 6, 3, stride=2, groups=2, dilation=1, rng=2)  # floor mode
        self.up = fc.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, rng=3)
        self.avg = fc.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.scale = fc.Parameter(rng(4).uniform(0.5, 1.5, (1, 4, 1, 1)).astype(np.float32))
        self.head = fc.Sequential(fc.Linear(4 * 8 * 8 + 8, 16, rng=5), fc.ReLU())
        self.bn1 = fc.BatchNorm1d(16)
        self.out = fc.Linear(16, 5, rng=6)
        self.proj = fc.Parameter(rng(7).standard_normal((5, 5)).astype(np.float32))
        self.drop = fc.Dropout(0.5)

    def forward(self, x):
        x = self.stem(x)  # (N, 8, 8, 8)
        x = fc.leaky_relu(self.bn(self.same(x)), 0.1) + x  # residual
        y = fc.elu(self.down(x), 0.7)  # (N, 6, 3, 3)
        y = self.up(y)  # (N, 4, 6, 6)
        y = fc.cat([y, fc.sigmoid(y)[:, :2], fc.tanh(y)[:, 2:]], 1)[:, :4]
        y = self.avg(F.conv2d_relu(y, np.ones((4, 4, 1, 1), np.float32) / 4, None, 1, 1))
        y = (y * self.scale - 0.25) / 2.0
        z = fc.cat([fc.flatten(y), fc.flatten(fc.adaptive_avg_pool2d(x, 1))], 1)
        z = self.bn1(self.drop(self.head(z)))
        z = fc.matmul(self.out(z), self.proj)
        return fc.log_softmax(z, 1) + fc.softmax(z, 1)


def test_user_module_with_every_exportable_op(tmp_path):
    model = random_bn_stats(Zoo()).eval()
    path = tmp_path / "zoo.onnx"
    fo.export(model, rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32), path, opset=13)
    x = rng(1).standard_normal((5, 3, 16, 16)).astype(np.float32)
    want = model(x).numpy()
    np.testing.assert_allclose(run_ort(path, x)[0], want, rtol=RTOL, atol=ATOL)
    loaded = fo.load(path)
    np.testing.assert_allclose(loaded(x).numpy(), want, rtol=RTOL, atol=ATOL)
    # and out again: the loaded model exports to an equal graph
    again = tmp_path / "again.onnx"
    fo.export(loaded, x[:2], again, opset=21)
    np.testing.assert_allclose(run_ort(again, x)[0], want, rtol=RTOL, atol=ATOL)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Conv", "Relu", "MaxPool", "ConvTranspose", "AveragePool", "Slice", "Concat"} <= ops
    assert {"GlobalAveragePool", "BatchNormalization", "Gemm", "MatMul", "Flatten"} <= ops


def test_export_keeps_parameter_names_and_fixed_batch(tmp_path):
    model = fc.models.lenet5(rng=0)
    path = tmp_path / "m.onnx"
    x = rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    fo.export(model, x, path, dynamic_batch=False, input_names=["image"], output_names=["logits"])
    proto = onnx.load(str(path))
    assert {i.name for i in proto.graph.initializer} >= set(model.state_dict())
    assert proto.graph.input[0].name == "image"
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    loaded = fo.load(path)
    with pytest.raises(ValueError, match=r"m.onnx: input 'image' must have shape \(4, 1, 28, 28\)"):
        loaded(x[:2])


def test_export_errors(tmp_path):
    model = fc.models.lenet5(rng=0)
    x = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(fo.OnnxError, match=r"opset must be an int from 13 to 21; got opset=12"):
        fo.export(model, x, tmp_path / "a.onnx", opset=12)

    class Summed(fc.Module):
        def forward(self, x):
            return fc.mean(x, (2, 3))

    with pytest.raises(fo.OnnxError, match=r"the op 'mean' has no ONNX form; exportable ops: "):
        fo.export(Summed(), x, tmp_path / "b.onnx")

    class BatchMix(fc.Module):
        def forward(self, x):
            return fc.cat([x, x], 0)

    with pytest.raises(fo.OnnxError, match=r"concatenates along the batch axis.*dynamic_batch"):
        fo.export(BatchMix(), x, tmp_path / "c.onnx")
    fo.export(BatchMix(), x, tmp_path / "c.onnx", dynamic_batch=False)
    assert run_ort(tmp_path / "c.onnx", x)[0].shape == (4, 1, 28, 28)

    bn = fc.BatchNorm2d(1, track_running_stats=False)
    with pytest.raises(fo.OnnxError, match=r"batch statistics"):
        fo.export(bn, x, tmp_path / "d.onnx")
    assert not (tmp_path / "d.onnx").exists()


# --------------------------------------------------------------------------- torch -> fastconv


def torch_nets():
    torch = pytest.importorskip("torch")
    from tests.test_autograd_parity import TNet
    from tests.test_models import torch_models
    from tests.test_zoo import TWINS

    nets = {"residual_inception": (TNet(), 3, 12), "lenet5": (torch_models()["lenet5"], 1, 28)}
    for name in ("resnet8", "inception_mini", "vgg_mini"):
        nets[name] = (TWINS[name](1, 10), 1, 28)
    torch.manual_seed(0)
    for net, _, _ in nets.values():
        for m in net.modules():  # distinct values: torch's exporter shares equal ones
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        net.eval()
    return torch, nets


def torch_export(torch, net, x, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (x,),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
            **kw,
        )


@pytest.mark.parametrize(
    "name", ["residual_inception", "lenet5", "resnet8", "inception_mini", "vgg_mini"]
)
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "kept"])
def test_torch_export_loads_into_fastconv(name, fold, tmp_path):
    torch, nets = torch_nets()
    net, c, s = nets[name]
    path = tmp_path / f"{name}.onnx"
    kw = (
        {} if fold else {"do_constant_folding": False, "training": torch.onnx.TrainingMode.PRESERVE}
    )
    torch_export(torch, net, torch.randn(2, c, s, s), path, **kw)
    loaded = fo.load(path)
    x = torch.randn(3, c, s, s)
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(loaded(x.numpy()).numpy(), want, rtol=RTOL, atol=ATOL)
    if not fold:  # BatchNorm kept: torch's state-dict keys and values
        sd = {k: v.numpy() for k, v in net.state_dict().items()}
        ours = loaded.state_dict()
        assert set(ours) == {k for k in sd if not k.endswith("num_batches_tracked")}
        for k, v in ours.items():
            np.testing.assert_array_equal(v, sd[k])


def test_torch_dynamo_export_loads_into_fastconv(tmp_path):
    pytest.importorskip("onnxscript")
    torch, nets = torch_nets()
    net, c, s = nets["residual_inception"]
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.randn(2, c, s, s),),
            str(path),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("N")},),
            verbose=False,
        )
    loaded = fo.load(path)
    x = torch.randn(3, c, s, s)
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(loaded(x.numpy()).numpy(), want, rtol=RTOL, atol=ATOL)


def test_loaded_model_trains_saves_and_reexports(tmp_path):
    torch, nets = torch_nets()
    net, c, s = nets["residual_inception"]
    path = tmp_path / "net.onnx"
    keep = {"do_constant_folding": False, "training": torch.onnx.TrainingMode.PRESERVE}
    torch_export(torch, net, torch.randn(2, c, s, s), path, **keep)
    model = fo.load(path)
    params = dict(model.named_parameters())
    assert set(params) == {k for k, _ in net.named_parameters()}
    before = {k: p.numpy().copy() for k, p in params.items()}
    x = rng(0).standard_normal((4, c, s, s)).astype(np.float32)
    y = np.array([0, 1, 2, 3])
    model.train()
    opt = fc.optim.SGD(model.parameters(), lr=0.1)
    loss = fc.CrossEntropyLoss()(model(x), y)
    loss.backward()
    for k, p in params.items():
        assert p.grad is not None and p.grad.shape == p.shape, k
        assert np.abs(np.asarray(p.grad)).sum() > 0, k
    opt.step()
    # (a conv bias before training-mode BatchNorm has a zero gradient up to rounding)
    moved = [k for k, p in params.items() if not np.array_equal(p.numpy(), before[k])]
    assert len(moved) >= len(params) - 1
    # the same step in torch: equal loss and gradients (batch statistics in training mode)
    net.train()
    tloss = torch.nn.CrossEntropyLoss()(net(torch.from_numpy(x)), torch.from_numpy(y))
    tloss.backward()
    np.testing.assert_allclose(float(loss), tloss.item(), rtol=1e-4)
    for k, tp in net.named_parameters():
        np.testing.assert_allclose(
            np.asarray(params[k].grad), tp.grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=k
        )
    net.eval()
    model.eval()
    fc.training.save_model(tmp_path / "w.npz", model)
    again = fo.load(path)
    fc.training.load_model(tmp_path / "w.npz", again)
    np.testing.assert_array_equal(again(x).numpy(), model(x).numpy())
    fo.export(again, x, tmp_path / "re.onnx")
    np.testing.assert_allclose(run_ort(tmp_path / "re.onnx", x)[0], model(x).numpy(), 1e-4, 1e-5)


# --------------------------------------------------------------------------- hand-built graphs


def graph_model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=[numpy_helper.from_array(np.asarray(a), n) for n, a in inits],
    )
    ops = [helper.make_opsetid("", opset)]
    m = helper.make_model(g, opset_imports=ops, ir_version=helper.find_min_ir_version_for(ops))
    return onnx.shape_inference.infer_shapes(m)  # the outputs' shapes (onnx.checker wants them)


def f32(*shape, seed=0):
    return rng(seed).standard_normal(shape).astype(np.float32)


def i64(*v):
    return np.asarray(v, np.int64)


N = helper.make_node
X4 = [("x", ["N", 4, 9, 10])]
CASES = {
    "conv_asymmetric_pads": (
        [N("Conv", ["x", "w", "b"], ["y"], pads=[0, 1, 2, 1], strides=[2, 1], dilations=[2, 1])],
        X4,
        [("w", f32(6, 4, 3, 3)), ("b", f32(6))],
    ),
    "conv_same_upper_stride2_group_dilation": (
        [N("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2], group=2)],
        X4,
        [("w", f32(6, 2, 4, 3))],
    ),
    "conv_same_lower_stride2": (
        [N("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER", strides=[2, 2])],
        X4,
        [("w", f32(3, 4, 2, 3))],
    ),
    "conv_transpose_asymmetric_pads": (
        [
            N(
                "ConvTranspose",
                ["x", "w", "b"],
                ["y"],
                strides=[2, 2],
                pads=[1, 0, 0, 2],
                output_padding=[1, 0],
                group=2,
            )
        ],
        X4,
        [("w", f32(4, 3, 3, 3)), ("b", f32(6))],
    ),
    "conv_transpose_output_shape": (
        [N("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], output_shape=[18, 19])],
        X4,
        [("w", f32(4, 2, 3, 3))],
    ),
    "maxpool_asymmetric_pads": (
        [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 2, 1])],
        X4,
        [],
    ),
    "maxpool_same_upper_ceil": (
        [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")],
        X4,
        [],
    ),
    "maxpool_ceil_mode": (
        [N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
        X4,
        [],
    ),
    "avgpool_asymmetric_exclude_pad": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[0, 1, 2, 2])],
        X4,
        [],
    ),
    "avgpool_asymmetric_include_pad": (
        [
            N(
                "AveragePool",
                ["x"],
                ["y"],
                kernel_shape=[3, 3],
                strides=[2, 1],
                pads=[1, 0, 0, 1],
                count_include_pad=1,
            )
        ],
        X4,
        [],
    ),
    "avgpool_symmetric_exclude_pad": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
        X4,
        [],
    ),
    "gemm_flags": (
        [N("Gemm", ["x", "w", "c"], ["y"], transA=1, transB=0, alpha=0.5, beta=2.0)],
        [("x", [7, 5])],
        [("w", f32(7, 3)), ("c", f32(1, 3))],
    ),
    "gemm_linear": (
        [N("Gemm", ["x", "w", "c"], ["y"], transB=1)],
        [("x", ["N", 7])],
        [("w", f32(3, 7)), ("c", f32(3))],
    ),
    "matmul_3d": ([N("MatMul", ["x", "w"], ["y"])], [("x", ["N", 4, 6])], [("w", f32(6, 3))]),
    "broadcasting": (
        [
            N("Add", ["x", "a"], ["t1"]),
            N("Sub", ["t1", "s"], ["t2"]),
            N("Mul", ["t2", "m"], ["t3"]),
            N("Div", ["t3", "d"], ["y"]),
        ],
        X4,
        [("a", f32(4, 1, 1)), ("s", f32(10)), ("m", f32(1, 4, 9, 1)), ("d", f32(1) ** 2 + 1)],
    ),
    "activations": (
        [
            N("LeakyRelu", ["x"], ["a"], alpha=0.2),
            N("Elu", ["a"], ["b"], alpha=0.5),
            N("Sigmoid", ["b"], ["c"]),
            N("Tanh", ["x"], ["d"]),
            N("Relu", ["d"], ["e"]),
            N("Concat", ["c", "e"], ["f"], axis=-3),
            N("Identity", ["f"], ["g"]),
            N("Dropout", ["g", "ratio"], ["h"]),
            N("Softmax", ["h"], ["i"], axis=1),
            N("LogSoftmax", ["i"], ["y"]),
        ],
        X4,
        [("ratio", np.asarray(0.3, np.float32))],
    ),
    "softmax_opset11_coerced": (
        [N("Softmax", ["x"], ["s"]), N("LogSoftmax", ["s"], ["y"], axis=2)],
        X4,
        [],
        11,
    ),
    "shape_chain_reshape": (
        [
            N("Shape", ["x"], ["shp"]),
            N("Gather", ["shp", "zero"], ["n"], axis=0),
            N("Unsqueeze", ["n", "ax0"], ["n1"]),
            N("Constant", [], ["rest"], value=numpy_helper.from_array(i64(-1))),
            N("Concat", ["n1", "rest"], ["target"], axis=0),
            N("Reshape", ["x", "target"], ["flat"]),
            N("Flatten", ["x"], ["flat2"], axis=2),
            N("Reshape", ["flat2", "target"], ["flat3"]),
            N("Sub", ["flat", "flat3"], ["diff"]),
            N("Add", ["flat", "diff"], ["y"]),
        ],
        X4,
        [("zero", np.asarray(0, np.int64)), ("ax0", i64(0))],
    ),
    "transpose_noop_and_2d": (
        [
            N("GlobalAveragePool", ["x"], ["p"]),
            N("Transpose", ["p"], ["t"], perm=[0, 2, 3, 1]),
            N("Squeeze", ["t", "axes"], ["s"]),
            N("Gemm", ["s", "w"], ["g"]),
            N("Transpose", ["g"], ["gt"]),
            N("Transpose", ["gt"], ["u"], perm=[1, 0]),
            N("Unsqueeze", ["u", "axes"], ["v"]),
            N("Slice", ["v", "st", "en", "sax"], ["y"]),
        ],
        X4,
        [
            ("axes", i64(1, 2)),
            ("w", f32(4, 6)),
            ("st", i64(1, -3)),
            ("en", i64(6, 1000)),
            ("sax", i64(3, 0)),
        ],
    ),
    "reduce_mean_batchnorm": (
        [
            N("BatchNormalization", ["x", "sc", "bi", "mu", "var"], ["bn"], epsilon=1e-3),
            N("ReduceMean", ["bn", "rax"], ["y"], keepdims=1),
        ],
        X4,
        [
            ("sc", f32(4)),
            ("bi", f32(4)),
            ("mu", f32(4)),
            ("var", np.abs(f32(4)) + 0.5),
            ("rax", i64(2, 3)),
        ],
        18,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_handmade_graph_equals_onnxruntime(case, tmp_path):
    nodes, inputs, inits, *opset = CASES[case]
    model = graph_model(nodes, inputs, ["y"], inits, *opset)
    path = tmp_path / f"{case}.onnx"
    onnx.save(model, str(path))
    shape = [3 if s == "N" else s for s in inputs[0][1]]
    x = f32(*shape, seed=5)
    want = run_ort(path, x)[0]
    loaded = fo.load(path)
    got = loaded(x).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # every parameter reached by the output gets a gradient
    xt = fc.Tensor(x, requires_grad=True)
    loaded(xt).sum().backward()
    assert xt.grad is not None and xt.grad.shape == x.shape
    for k, p in loaded.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, k


# --------------------------------------------------------------------------- bad input


def save(model, path):
    onnx.save(model, str(path))
    return path


def conv_model(**kw):
    return graph_model(
        [N("Conv", ["x", "w"], ["y"], name="conv0")], X4, ["y"], [("w", f32(2, 4, 3, 3))], **kw
    )


def test_corrupt_empty_and_missing_files(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(fo.OnnxError, match=r"junk.onnx: not (a readable|an) ONNX model"):
        fo.load(tmp_path / "junk.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(fo.OnnxError, match=r"empty.onnx: not an ONNX model"):
        fo.load(tmp_path / "empty.onnx")
    good = save(conv_model(), tmp_path / "good.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(good[: len(good) // 2])
    with pytest.raises(fo.OnnxError, match=r"cut.onnx: "):
        fo.load(tmp_path / "cut.onnx")
    with pytest.raises(FileNotFoundError, match=r"nothere.onnx: no such file"):
        fo.load(tmp_path / "nothere.onnx")


def test_unsupported_opset(tmp_path):
    m = conv_model(opset=8)
    with pytest.raises(fo.OnnxError, match=r"old.onnx: opset 8 is not supported; .* 9 to 22"):
        fo.load(save(m, tmp_path / "old.onnx"))
    m = conv_model()
    m.opset_import[0].version = 23
    with pytest.raises(fo.OnnxError, match=r"opset 23 is not supported"):
        fo.load(save(m, tmp_path / "new.onnx"))


def test_unsupported_op_names_node_op_and_supported_set(tmp_path):
    m = graph_model([N("Sin", ["x"], ["y"], name="wave")], X4, ["y"])
    with pytest.raises(fo.OnnxError) as e:
        fo.load(save(m, tmp_path / "sin.onnx"))
    msg = str(e.value)
    assert "sin.onnx: node 'wave' (Sin): op type 'Sin' is not supported" in msg
    assert "Conv" in msg and "BatchNormalization" in msg


def test_unsupported_attributes_and_shapes_are_refused_at_load(tmp_path):
    cases = [
        (
            graph_model(
                [N("Conv", ["x", "w"], ["y"])], [("x", [1, 4, 9])], ["y"], [("w", f32(2, 4, 3))]
            ),
            r"only 2-D",
        ),
        (
            graph_model(
                [N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])], X4, ["y"]
            ),
            r"dilations=\[2, 2\] are not supported",
        ),
        (
            graph_model([N("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], X4, ["y"]),
            r"perm=\[0, 2, 3, 1\] .* moves data",
        ),
        (
            graph_model(
                [
                    N("Shape", ["x"], ["s"]),
                    N("Cast", ["s"], ["f"], to=TensorProto.FLOAT),
                    N("Mul", ["x", "f"], ["y"]),
                ],
                [("x", ["N", 2])],
                ["y"],
            ),
            r"\(Cast\): casts shape values to float32",
        ),
        (
            graph_model(
                [N("Reshape", ["x", "t"], ["y"])], X4, ["y"], [("t", np.asarray([3.0, -1.0]))]
            ),
            r"bad4.onnx: invalid ONNX model",  # a float shape breaks the type rules
        ),
    ]
    for k, (m, pattern) in enumerate(cases):
        with pytest.raises(fo.OnnxError, match=pattern):
            fo.load(save(m, tmp_path / f"bad{k}.onnx"))


def test_dynamic_shapes_and_wrong_inputs(tmp_path):
    m = graph_model(
        [N("Conv", ["x", "w"], ["y"])], [("x", ["N", 4, "H", "W"])], ["y"], [("w", f32(2, 4, 3, 3))]
    )
    path = save(m, tmp_path / "dyn.onnx")
    with pytest.raises(
        fo.OnnxError, match=r"dyn.onnx: input 'x' has a dynamic axis 2 .*input_shape"
    ):
        fo.load(path)
    model = fo.load(path, input_shape=(None, 4, 9, 10))
    x = f32(2, 4, 9, 10)
    np.testing.assert_allclose(model(x).numpy(), run_ort(path, x)[0], rtol=RTOL, atol=ATOL)
    with pytest.raises(
        ValueError,
        match=r"dyn.onnx: input 'x' must have shape \(N, 4, 9, 10\); got \(2, 3, 9, 10\)",
    ):
        model(f32(2, 3, 9, 10))
    with pytest.raises(ValueError, match=r"must have shape \(N, 4, 9, 10\); got \(4, 9, 10\)"):
        model(f32(4, 9, 10))
    with pytest.raises(ValueError, match=r"takes 1 input\(s\); got 2"):
        model(x, x)
    with pytest.raises(fo.OnnxError, match=r"input has 3 channels; the weight"):
        fo.load(path, input_shape=(None, 3, 9, 10))  # the weight wants 4 channels


def test_external_data_must_stay_in_the_models_folder(tmp_path):
    inside = tmp_path / "model"
    inside.mkdir()
    m = conv_model()
    onnx.save(
        m,
        str(inside / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    model = fo.load(inside / "ext.onnx")
    x = f32(2, 4, 9, 10)
    np.testing.assert_allclose(model(x).numpy(), run_ort(inside / "ext.onnx", x)[0], 1e-4, 1e-5)
    # point the weight at a file outside the folder
    os.replace(inside / "weights.bin", tmp_path / "weights.bin")
    proto = onnx.load(str(inside / "ext.onnx"), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../weights.bin"
    onnx.save(proto, str(inside / "escape.onnx"))
    with pytest.raises(
        fo.OnnxError, match=r"escape.onnx: initializer 'w' .*outside the model's folder; refused"
    ):
        fo.load(inside / "escape.onnx")


def test_loaded_model_runs_in_float64_and_keeps_keys(tmp_path):
    path = save(conv_model(), tmp_path / "c.onnx")
    model = fo.load(path).to(np.float64)
    assert list(model.state_dict()) == ["w"]
    x = f32(2, 4, 9, 10).astype(np.float64)
    y = model(x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y.numpy(), run_ort(path, x.astype(np.float32))[0], 1e-4, 1e-5)


# --------------------------------------------------------------------------- CLI


def test_cli_export(tmp_path, capsys):
    from fastconv import cli

    model = fc.models.lenet5(rng=3)
    fc.training.save_model(tmp_path / "m.npz", model, {"model": "lenet5"})
    out = tmp_path / "m.onnx"
    assert cli.main(["export", "--load", str(tmp_path / "m.npz"), "--onnx", str(out)]) == 0
    assert "m.onnx" in capsys.readouterr().out
    x = f32(3, 1, 28, 28)
    np.testing.assert_allclose(run_ort(out, x)[0], model.eval()(x).numpy(), rtol=RTOL, atol=ATOL)


def test_readme_onnx_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    from tests.test_readme import _blocks

    (block,) = [b for b in _blocks() if "fc.onnx" in b]
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, "README.md", "exec"), {})
    errs = [float(v) for v in capsys.readouterr().out.split()[-2:]]
    assert max(errs) < 1e-4
