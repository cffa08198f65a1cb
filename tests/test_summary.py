"""fc.summary and ``fastconv summary``: rows, parameter counts, multiply-adds counted by hand,
the model left as it was, and the command's output."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import cli, models
from fastconv.summary import collect

# LeNet-5 per image, by hand: conv = output elements * C_in * KH * KW; linear = in * out
LENET5_MACS = {
    "0": 6 * 28 * 28 * 1 * 5 * 5,  # 117,600
    "3": 16 * 10 * 10 * 6 * 5 * 5,  # 240,000
    "7": 400 * 120,
    "9": 120 * 84,
    "11": 84 * 10,
}


def test_lenet5_macs_and_shapes_by_hand():
    rows, totals = collect(models.lenet5(rng=0), (1, 28, 28))
    assert [r.name for r in rows] == [str(i) for i in range(12)]
    assert {r.name: r.macs for r in rows if r.macs} == LENET5_MACS
    assert totals.macs == 416_520 == sum(LENET5_MACS.values())
    assert [r.output_shape for r in rows[:7]] == [
        (1, 6, 28, 28),
        (1, 6, 28, 28),
        (1, 6, 14, 14),
        (1, 16, 10, 10),
        (1, 16, 10, 10),
        (1, 16, 5, 5),
        (1, 400),
    ]
    assert [r.params for r in rows if r.params] == [156, 2416, 48120, 10164, 850]
    assert totals.output_shape == (1, 10) and totals.input_shape == (1, 1, 28, 28)
    # a batch multiplies the MACs, not the parameters
    _, t4 = collect(models.lenet5(rng=0), (4, 1, 28, 28))
    assert t4.macs == 4 * 416_520 and t4.params == 61_706


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_parameter_counts_are_exact(name):
    model = models.get(name, rng=0)
    rows, totals = collect(model, (1, 28, 28))
    n = sum(p.data.size for p in model.parameters())
    assert totals.params == totals.trainable == n and totals.non_trainable == 0
    assert sum(r.params for r in rows) == n  # every parameter on exactly one row
    text = fc.summary(model, (1, 28, 28))
    assert f"Total params: {n:,}" in text and f"Total MACs: {totals.macs:,}" in text
    assert type(model).__name__ in text.splitlines()[0]


def test_resnet8_rows_macs_and_buffers():
    model = models.resnet8(in_channels=3, num_classes=7, rng=0)
    rows, totals = collect(model, (3, 32, 32))
    by = {r.name: r for r in rows}
    assert by["conv1"].macs == 16 * 32 * 32 * 3 * 9
    assert by["layer3.0.downsample.0"].output_shape == (1, 64, 8, 8)
    assert by["layer3.0.downsample.0"].macs == 64 * 8 * 8 * 32
    assert by["layer3.0.conv1"].kind == "Conv2d" and by["layer3.0.bn2"].macs == 0
    assert by["fc"].macs == 64 * 7 and by["fc"].output_shape == (1, 7)
    bn = [m for m in model.modules() if isinstance(m, fc.BatchNorm2d)]
    assert totals.buffers == sum(2 * m.num_features for m in bn)


def test_model_state_and_modes_are_left_as_they_were():
    model = models.resnet8(rng=0)
    model.layer2.eval()  # a mixed mode must survive
    before = {k: v.copy() for k, v in model.state_dict().items()}
    fc.summary(model, (1, 28, 28))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert model.training and model.layer1.training and not model.layer2[0].bn1.training
    assert all(not m._forward_hooks for m in model.modules())
    nielsen = models.nielsen(rng=0)
    states = [g.bit_generator.state for _, g in nielsen.named_generators()]
    fc.summary(nielsen, (1, 28, 28))
    assert [g.bit_generator.state for _, g in nielsen.named_generators()] == states


def test_frozen_shared_and_transposed_layers():
    class Net(fc.Module):
        def __init__(self):
            super().__init__()
            self.conv = fc.Conv2d(2, 2, 3, padding=1)
            self.up = fc.ConvTranspose2d(2, 4, 2, stride=2, groups=2)
            self.head = fc.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            x = self.conv(self.conv(x))  # the same layer twice
            return self.head(fc.flatten(self.up(x)))

    net = Net()
    net.conv.requires_grad_(False)
    rows, totals = collect(net, (2, 4, 4))
    assert [r.name for r in rows] == ["conv", "conv", "up", "head"]
    assert [r.params for r in rows] == [2 * 2 * 9 + 2, 0, 2 * 2 * 4 + 4, 256 * 3 + 3]
    assert rows[0].macs == rows[1].macs == 2 * 4 * 4 * 2 * 9
    assert rows[2].macs == 2 * 4 * 4 * (4 // 2) * 2 * 2  # input elements * C_out/G * KH * KW
    assert totals.non_trainable == 38 and totals.trainable == totals.params - 38
    lines = []
    text = fc.summary(net, (2, 4, 4), print_fn=lines.append)
    assert lines == [text] and "Non-trainable params: 38" in text


def test_float64_models_take_a_float64_input():
    model = models.vgg_mini(rng=0, dtype=np.float64)
    assert "float64" in fc.summary(model, (1, 28, 28), dtype=np.float64).splitlines()[0]


def test_command_prints_the_table(capsys):
    assert cli.main(["summary", "--model", "resnet8", "--in-channels", "3", "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "Model: ResNet (input (1, 3, 32, 32), float32)" in out
    assert "layer3.0.downsample.0 (Conv2d)" in out and "Total params: 78,042" in out
    model = models.inception_mini(num_classes=7, rng=0)
    assert cli.main(["summary", "--model", "inception_mini", "--num-classes", "7"]) == 0
    n = sum(p.data.size for p in model.parameters())
    assert f"Total params: {n:,}" in capsys.readouterr().out
    assert cli.main(["summary"]) == 0  # lenet5 by default
    assert "Total MACs: 416,520" in capsys.readouterr().out


def test_command_errors_name_the_problem():
    with pytest.raises(SystemExit, match="lenet5 takes 1-channel images"):
        cli.main(["summary", "--model", "lenet5", "--in-channels", "3"])
    with pytest.raises(SystemExit, match="lenet5 on 32 px inputs: linear: x has 576 features"):
        cli.main(["summary", "--model", "lenet5", "--size", "32"])
