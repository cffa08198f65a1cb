"""Model zoo, each equal layer for layer to a torch module (same names, so state dicts move
between them unchanged).

- ``lenet5``, ``nielsen``, ``mnist_cnn``: small MNIST networks as ``fc.Sequential`` (equal to a
  ``torch.nn.Sequential`` with the same indices); inputs (N, 1, 28, 28), outputs (N, 10).
- ``resnet8``, ``resnet20`` (CIFAR ResNets, He et al. 2016 section 4.2), ``inception_mini``
  (GoogLeNet-style blocks) and ``vgg_mini`` (3x3 conv + BN + ReLU stacks): Modules taking
  ``in_channels`` (1 or 3) and ``num_classes``; global average pooling before the head makes
  them work on any input of at least 8 px (28 px MNIST and 32 px CIFAR alike). Convolutions
  start from torchvision's Kaiming-normal (fan_out, ReLU gain); BatchNorm from weight 1, bias
  0; Linear layers from PyTorch's default.

All take ``rng`` (seed or Generator) for the initial weights and Dropout masks, and ``dtype``.
Each builder carries its default training recipe (``builder.recipe``, set by ``@_recipe`` above
its definition; ``defaults(name, dataset)``): what ``fastconv train --model NAME`` uses for every
setting not given on the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import _device
from . import functional as F
from . import init as _init
from .layers import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential
from .nn import AdaptiveAvgPool2d, BatchNorm2d, Module, bn_relu

# --------------------------------------------------------------------------- default recipes


def _recipe(**settings: Any) -> Callable[[Callable[..., Module]], Callable[..., Module]]:
    """Attach a zoo model's default training recipe to its builder (``builder.recipe``).

    Keys are ``fastconv train``'s settings by their argparse names (optimizer, lr, momentum,
    weight_decay, lr_decay or schedule, epochs, batch_size, augment, ...); ``cifar`` holds the
    ones that change on CIFAR-10/100. ``fastconv train --model NAME`` uses them for every
    setting not given on the command line (``defaults``)."""

    def attach(builder: Callable[..., Module]) -> Callable[..., Module]:
        builder.recipe = settings  # type: ignore[attr-defined]
        return builder

    return attach


# SGD with momentum and an lr multiplied by lr_decay after every epoch: the one schedule every
# training path takes (--distributed and --ensemble included).
_SGD = {"optimizer": "sgd", "momentum": 0.9}
# The BatchNorm networks on CIFAR: crop-flip augmentation and a longer, slower decay.
_CIFAR = {"augment": "crop-flip", "epochs": 30, "lr_decay": 0.9}


@_recipe(**_SGD, lr=0.05, weight_decay=5e-4, lr_decay=0.8, epochs=10, batch_size=64)
def lenet5(*, rng: _init.RngLike = None, dtype: Any = np.float32) -> Sequential:
    """LeNet-5 with ReLU and max pooling (61,706 parameters).

    conv 6@5x5 pad 2, ReLU, maxpool 2, conv 16@5x5, ReLU, maxpool 2, flatten,
    FC 120, ReLU, FC 84, ReLU, FC 10.

    Shape: x (N, 1, 28, 28) -> logits (N, 10).
    """
    g = _init.get_rng(rng)
    return Sequential(
        Conv2d(1, 6, 5, padding=2, rng=g, dtype=dtype),  # 0: (N, 6, 28, 28)
        ReLU(),
        MaxPool2d(2),  # 2: (N, 6, 14, 14)
        Conv2d(6, 16, 5, rng=g, dtype=dtype),  # 3: (N, 16, 10, 10)
        ReLU(),
        MaxPool2d(2),  # 5: (N, 16, 5, 5)
        Flatten(),  # 6: (N, 400)
        Linear(400, 120, rng=g, dtype=dtype),
        ReLU(),
        Linear(120, 84, rng=g, dtype=dtype),
        ReLU(),
        Linear(84, 10, rng=g, dtype=dtype),
    )


@_recipe(
    **_SGD, lr=0.03, weight_decay=0.0, lr_decay=0.85, epochs=20, batch_size=64, augment="shift"
)
def nielsen(*, rng: _init.RngLike = None, dtype: Any = np.float32) -> Sequential:
    """The final network of Nielsen's "Neural Networks and Deep Learning", chapter 6.

    conv 20@5x5, ReLU, maxpool 2, conv 40@5x5, ReLU, maxpool 2, flatten,
    FC 1000, ReLU, dropout 0.5, FC 1000, ReLU, dropout 0.5, FC 10 (1.7 M parameters).
    Nielsen reaches 99.6 % with it on "expanded" (shifted) training data.

    Shape: x (N, 1, 28, 28) -> logits (N, 10).
    """
    g = _init.get_rng(rng)
    return Sequential(
        Conv2d(1, 20, 5, rng=g, dtype=dtype),  # 0: (N, 20, 24, 24)
        ReLU(),
        MaxPool2d(2),  # 2: (N, 20, 12, 12)
        Conv2d(20, 40, 5, rng=g, dtype=dtype),  # 3: (N, 40, 8, 8)
        ReLU(),
        MaxPool2d(2),  # 5: (N, 40, 4, 4)
        Flatten(),  # 6: (N, 640)
        Linear(640, 1000, rng=g, dtype=dtype),
        ReLU(),
        Dropout(0.5, rng=_init.spawn(g)),
        Linear(1000, 1000, rng=g, dtype=dtype),
        ReLU(),
        Dropout(0.5, rng=_init.spawn(g)),
        Linear(1000, 10, rng=g, dtype=dtype),
    )


@_recipe(optimizer="adam", lr=1e-3, weight_decay=0.0, lr_decay=0.7, epochs=10, batch_size=64)
def mnist_cnn(*, rng: _init.RngLike = None, dtype: Any = np.float32) -> Sequential:
    """The Keras/PyTorch "mnist" example CNN (1.2 M parameters).

    conv 32@3x3, ReLU, conv 64@3x3, ReLU, maxpool 2, dropout 0.25, flatten, FC 128, ReLU,
    dropout 0.5, FC 10.

    Shape: x (N, 1, 28, 28) -> logits (N, 10).
    """
    g = _init.get_rng(rng)
    return Sequential(
        Conv2d(1, 32, 3, rng=g, dtype=dtype),  # 0: (N, 32, 26, 26)
        ReLU(),
        Conv2d(32, 64, 3, rng=g, dtype=dtype),  # 2: (N, 64, 24, 24)
        ReLU(),
        MaxPool2d(2),  # 4: (N, 64, 12, 12)
        Dropout(0.25, rng=_init.spawn(g)),
        Flatten(),  # 6: (N, 9216)
        Linear(9216, 128, rng=g, dtype=dtype),
        ReLU(),
        Dropout(0.5, rng=_init.spawn(g)),
        Linear(128, 10, rng=g, dtype=dtype),
    )


def fast99(*, rng: _init.RngLike = None, dtype: Any = np.float32) -> Sequential:
    """The time-to-99 % MNIST network (``fastconv train --recipe fast99``; 24,986 parameters).

    conv 24@5x5, ReLU, maxpool 2, conv 32@5x5, ReLU, maxpool 2, flatten, FC 10: two
    conv + ReLU + max-pool runs, each one fused op. With Adam, a one-cycle schedule, batch 64
    and label smoothing 0.1 it passes 99 % test accuracy in one epoch
    (benchmarks/time_to_accuracy.py).

    Shape: x (N, 1, 28, 28) -> logits (N, 10).
    """
    g = _init.get_rng(rng)
    return Sequential(
        Conv2d(1, 24, 5, rng=g, dtype=dtype),  # 0: (N, 24, 24, 24)
        ReLU(),
        MaxPool2d(2),  # 2: (N, 24, 12, 12)
        Conv2d(24, 32, 5, rng=g, dtype=dtype),  # 3: (N, 32, 8, 8)
        ReLU(),
        MaxPool2d(2),  # 5: (N, 32, 4, 4)
        Flatten(),  # 6: (N, 512)
        Linear(512, 10, rng=g, dtype=dtype),
    )


# --------------------------------------------------------------------------- building blocks


def _check_count(model: str, name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{model}: {name} must be a positive int; got {name}={v!r}")
    return int(v)


def _conv(
    cin: int, cout: int, k: int, stride: int, padding: int, g: np.random.Generator, dtype: Any
) -> Conv2d:
    """A bias-free convolution (BatchNorm follows) with torchvision's ResNet/VGG init:
    weight ~ N(0, 2 / fan_out), fan_out = cout * k * k (``kaiming_normal_``, mode fan_out)."""
    conv = Conv2d(cin, cout, k, stride, padding, bias=False, rng=g, dtype=dtype)
    w = np.empty(conv.weight.shape, conv.dtype)
    _init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", rng=g)
    conv.weight.data = _device.like(conv.weight.data, w)
    return conv


class BasicBlock(Module):
    """The ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    conv1 is 3x3 with ``stride``, conv2 3x3; the shortcut is the identity when the shape is
    kept and a 1x1 conv (stride ``stride``) + BatchNorm2d projection, ``downsample``, when it
    changes (option B of He et al. 2016). Module names are torchvision's.

    Shape: x (N, in_planes, H, W) -> (N, planes, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        rng: _init.RngLike = None,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        g = _init.get_rng(rng)
        self.conv1 = _conv(in_planes, planes, 3, stride, 1, g, dtype)
        self.bn1 = BatchNorm2d(planes, dtype=dtype)
        self.conv2 = _conv(planes, planes, 3, 1, 1, g, dtype)
        self.bn2 = BatchNorm2d(planes, dtype=dtype)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = Sequential(
                _conv(in_planes, planes, 1, stride, 0, g, dtype), BatchNorm2d(planes, dtype=dtype)
            )

    def forward(self, x: Any) -> Any:
        y = bn_relu(self.bn1, self.conv1(x))  # relu(bn1(...)) as one fused op
        shortcut = x if self.downsample is None else self.downsample(x)
        return bn_relu(self.bn2, self.conv2(y), shortcut)  # relu(bn2(...) + shortcut), fused


class ResNet(Module):
    """The CIFAR ResNet of He et al. 2016, section 4.2, with 6n + 2 weighted layers.

    conv1 3x3 (16) + bn1 + ReLU; layer1, layer2, layer3: n ``BasicBlock`` each at ``widths``
    (16, 32, 64) channels, the first block of each stage after the first with stride 2 and a
    1x1 projection shortcut; global average pooling (``avgpool``); ``fc`` Linear head.

    Shape: x (N, in_channels, H, W) -> logits (N, num_classes).
    """

    def __init__(
        self,
        n: int,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        widths: tuple[int, int, int] = (16, 32, 64),
        rng: _init.RngLike = None,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        n = _check_count("ResNet", "n", n)
        g = _init.get_rng(rng)
        self.conv1 = _conv(in_channels, widths[0], 3, 1, 1, g, dtype)
        self.bn1 = BatchNorm2d(widths[0], dtype=dtype)
        cin, self.stages = widths[0], len(widths)
        for stage, width in enumerate(widths):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, width, stride, rng=g, dtype=dtype))
                cin = width
            self.register_module(f"layer{stage + 1}", Sequential(*blocks))
        self.avgpool = AdaptiveAvgPool2d(1)
        self.fc = Linear(cin, num_classes, rng=g, dtype=dtype)

    def forward(self, x: Any) -> Any:
        x = bn_relu(self.bn1, self.conv1(x))
        for stage in range(1, self.stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(F.flatten(self.avgpool(x)))


@_recipe(**_SGD, lr=0.1, weight_decay=5e-4, lr_decay=0.8, epochs=10, batch_size=128, cifar=_CIFAR)
def resnet8(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    rng: _init.RngLike = None,
    dtype: Any = np.float32,
) -> ResNet:
    """ResNet-8 (n = 1): 77,754 parameters (1 channel, 10 classes; 78,042 for 3 channels).

    conv 3x3 16 + BN + ReLU; one basic block per stage at 16, 32 (stride 2, projection), 64
    (stride 2, projection) channels; global average pool; FC num_classes. 8 weighted layers
    (7 convs on the main path, the FC head) plus 2 projection convs.

    Shape: x (N, in_channels, 28 or 32, same) -> logits (N, num_classes).
    """
    return ResNet(1, in_channels, num_classes, rng=rng, dtype=dtype)


@_recipe(**_SGD, lr=0.1, weight_decay=5e-4, lr_decay=0.8, epochs=10, batch_size=128, cifar=_CIFAR)
def resnet20(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    rng: _init.RngLike = None,
    dtype: Any = np.float32,
) -> ResNet:
    """ResNet-20 (n = 3): 272,186 parameters (1 channel, 10 classes; 272,474 for 3 channels);
    the paper's 0.27 M with option-A shortcuts, plus 2,752 for the two projections.

    conv 3x3 16 + BN + ReLU; three basic blocks per stage at 16, 32, 64 channels (the first
    of stages 2 and 3 with stride 2 and a 1x1 projection); global average pool; FC num_classes.

    Shape: x (N, in_channels, 28 or 32, same) -> logits (N, num_classes).
    """
    return ResNet(3, in_channels, num_classes, rng=rng, dtype=dtype)


class BasicConv2d(Module):
    """conv (no bias) + BatchNorm2d + ReLU, torchvision's GoogLeNet unit (``conv``, ``bn``).

    Shape: x (N, in_channels, H, W) -> (N, out_channels, OH, OW) as Conv2d.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        *,
        rng: _init.RngLike = None,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        g = _init.get_rng(rng)
        self.conv = _conv(in_channels, out_channels, kernel_size, 1, padding, g, dtype)
        self.bn = BatchNorm2d(out_channels, dtype=dtype)

    def forward(self, x: Any) -> Any:
        return bn_relu(self.bn, self.conv(x))


class InceptionBlock(Module):
    """A GoogLeNet Inception block (Szegedy et al. 2015, figure 2b): four branches on the same
    input, concatenated on channels in this order:

    branch1 1x1; branch2 1x1 -> 3x3; branch3 1x1 -> 5x5 (a true 5x5); branch4 3x3 max-pool
    (stride 1, pad 1) -> 1x1. Every conv is a ``BasicConv2d`` (conv + BatchNorm + ReLU, as
    torchvision's GoogLeNet; the BatchNorm makes these small nets train at SGD's usual rates).

    Shape: x (N, in_channels, H, W) -> (N, ch1x1 + ch3x3 + ch5x5 + pool_proj, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        *,
        rng: _init.RngLike = None,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        g, c = _init.get_rng(rng), {"dtype": dtype}
        self.branch1 = BasicConv2d(in_channels, ch1x1, 1, rng=g, **c)
        self.branch2 = Sequential(
            BasicConv2d(in_channels, ch3x3red, 1, rng=g, **c),
            BasicConv2d(ch3x3red, ch3x3, 3, padding=1, rng=g, **c),
        )
        self.branch3 = Sequential(
            BasicConv2d(in_channels, ch5x5red, 1, rng=g, **c),
            BasicConv2d(ch5x5red, ch5x5, 5, padding=2, rng=g, **c),
        )
        self.branch4 = Sequential(
            MaxPool2d(3, 1, 1), BasicConv2d(in_channels, pool_proj, 1, rng=g, **c)
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: Any) -> Any:
        return F.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionMini(Module):
    """A small GoogLeNet: ``conv1`` BasicConv2d 3x3 (32) -> ``maxpool1`` 2 -> ``inception3a``
    (56 channels) -> ``inception3b`` (112) -> ``maxpool2`` 2 -> ``inception4a`` (144) ->
    global average pool -> ``fc``.

    Shape: x (N, in_channels, H, W) -> logits (N, num_classes); H, W >= 4.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        rng: _init.RngLike = None,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        g, c = _init.get_rng(rng), {"dtype": dtype}
        self.conv1 = BasicConv2d(in_channels, 32, 3, padding=1, rng=g, **c)
        self.maxpool1 = MaxPool2d(2)
        self.inception3a = InceptionBlock(32, 16, 16, 24, 4, 8, 8, rng=g, **c)
        self.inception3b = InceptionBlock(56, 32, 32, 48, 8, 16, 16, rng=g, **c)
        self.maxpool2 = MaxPool2d(2)
        self.inception4a = InceptionBlock(112, 48, 32, 64, 8, 16, 16, rng=g, **c)
        self.avgpool = AdaptiveAvgPool2d(1)
        self.fc = Linear(self.inception4a.out_channels, num_classes, rng=g, **c)

    def forward(self, x: Any) -> Any:
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        return self.fc(F.flatten(self.avgpool(x)))


@_recipe(**_SGD, lr=0.1, weight_decay=5e-4, lr_decay=0.8, epochs=10, batch_size=128, cifar=_CIFAR)
def inception_mini(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    rng: _init.RngLike = None,
    dtype: Any = np.float32,
) -> InceptionMini:
    """A small GoogLeNet of three Inception blocks: 63,522 parameters (1 channel, 10 classes;
    64,098 for 3 channels).

    BasicConv2d 3x3 32 (conv + BN + ReLU), maxpool 2; Inception 3a (1x1 16 | 1x1 16 -> 3x3
    24 | 1x1 4 -> 5x5 8 | pool -> 1x1 8: 56 channels), 3b (32 | 32 -> 48 | 8 -> 16 | 16: 112),
    maxpool 2; 4a (48 | 32 -> 64 | 8 -> 16 | 16: 144); global average pool; FC num_classes.

    Shape: x (N, in_channels, 28 or 32, same) -> logits (N, num_classes).
    """
    return InceptionMini(in_channels, num_classes, rng=rng, dtype=dtype)


VGG_MINI = (32, 32, "M", 64, 64, "M", 128, "M")


class VGG(Module):
    """VGG with BatchNorm (Simonyan & Zisserman 2015; torchvision's ``vgg*_bn`` layout):
    ``features`` = for each int c of ``cfg`` a 3x3 conv (pad 1, no bias) + BatchNorm2d + ReLU,
    for each "M" a 2x2 max-pool; then ``avgpool`` (global average pool, so the head does not
    depend on the input size) and ``classifier`` = Linear(c, hidden), ReLU, Linear(hidden,
    num_classes).

    Shape: x (N, in_channels, H, W) -> logits (N, num_classes); H, W >= 2 ** (number of "M").
    """

    def __init__(
        self,
        cfg: tuple = VGG_MINI,
        in_channels: int = 1,
        num_classes: int = 10,
        hidden: int = 128,
        *,
        rng: _init.RngLike = None,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        g, layers, c = _init.get_rng(rng), [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(MaxPool2d(2))
            else:
                width = _check_count("VGG", "a cfg width", v)
                layers += [_conv(c, width, 3, 1, 1, g, dtype), BatchNorm2d(width, dtype=dtype)]
                layers.append(ReLU())
                c = width
        self.features = Sequential(*layers)
        self.avgpool = AdaptiveAvgPool2d(1)
        self.classifier = Sequential(
            Linear(c, hidden, rng=g, dtype=dtype),
            ReLU(),
            Linear(hidden, num_classes, rng=g, dtype=dtype),
        )

    def forward(self, x: Any) -> Any:
        return self.classifier(F.flatten(self.avgpool(self.features(x))))


@_recipe(**_SGD, lr=0.1, weight_decay=5e-4, lr_decay=0.8, epochs=10, batch_size=128, cifar=_CIFAR)
def vgg_mini(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    rng: _init.RngLike = None,
    dtype: Any = np.float32,
) -> VGG:
    """A small VGG with BatchNorm: 156,970 parameters (1 channel, 10 classes; 157,546 for 3
    channels).

    [conv 3x3 32, conv 3x3 32, maxpool 2, conv 3x3 64, conv 3x3 64, maxpool 2, conv 3x3 128,
    maxpool 2], each conv followed by BN + ReLU; global average pool; FC 128, ReLU, FC
    num_classes. 28 px inputs reach the pool at 3x3, 32 px at 4x4.

    Shape: x (N, in_channels, 28 or 32, same) -> logits (N, num_classes).
    """
    return VGG(VGG_MINI, in_channels, num_classes, rng=rng, dtype=dtype)


MODELS: dict[str, Callable[..., Module]] = {
    "lenet5": lenet5,
    "nielsen": nielsen,
    "mnist_cnn": mnist_cnn,
    "fast99": fast99,
    "resnet8": resnet8,
    "resnet20": resnet20,
    "inception_mini": inception_mini,
    "vgg_mini": vgg_mini,
}

# The zoo models that take ``in_channels`` and ``num_classes`` (any input of 28 px or more);
# the others are fixed to (N, 1, 28, 28) -> (N, 10).
CONFIGURABLE = ("resnet8", "resnet20", "inception_mini", "vgg_mini")


def defaults(name: str, dataset: str | None = None) -> dict[str, Any]:
    """The default training recipe of zoo model ``name`` (``fastconv train --model NAME`` uses
    it for every setting not given), with its CIFAR changes when ``dataset`` is cifar10 or
    cifar100; {} for a model without one."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    recipe = dict(getattr(MODELS[name], "recipe", {}))
    cifar = recipe.pop("cifar", {})
    if dataset in ("cifar10", "cifar100"):
        recipe.update(cifar)
    return recipe


def get(name: str, **kwargs: Any) -> Module:
    """Build a zoo model by name (see ``MODELS``); keyword arguments go to its builder."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = [
    "CONFIGURABLE",
    "MODELS",
    "VGG",
    "VGG_MINI",
    "BasicBlock",
    "BasicConv2d",
    "InceptionBlock",
    "InceptionMini",
    "ResNet",
    "defaults",
    "fast99",
    "get",
    "inception_mini",
    "lenet5",
    "mnist_cnn",
    "nielsen",
    "resnet20",
    "resnet8",
    "vgg_mini",
]
