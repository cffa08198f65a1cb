"""Argument normalisation, output-size rules and every user-facing error text.

Notation (shared by every module): x (N, C, H, W), weight (K, C/G, KH, KW), y (N, K, OH, OW).

Everything here is pure arithmetic on shapes and dtypes; it never touches array data, so it works
the same for NumPy arrays and device arrays. A kernel is only ever called with a geometry built
here, which is what makes the unchecked loops in ``fastconv.kernels`` memory-safe.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_NATIVE_FLOATS = frozenset(FLOAT_DTYPES)


class ConvGeom(NamedTuple):
    """Normalised geometry of one 2-D convolution. ``ph``/``pw`` are the top/left padding.

    The bottom/right padding is implicit in OH/OW (it may differ from the top/left one for
    ``padding='same'`` with an even effective kernel, as in PyTorch). Kernels treat every input
    position outside [0, H) x [0, W) as zero.
    """

    N: int
    C: int
    H: int
    W: int
    K: int
    KH: int
    KW: int
    OH: int
    OW: int
    G: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int

    @property
    def CG(self) -> int:  # input channels per group
        return self.C // self.G

    @property
    def KG(self) -> int:  # output channels per group
        return self.K // self.G

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)

    @property
    def w_shape(self) -> tuple[int, int, int, int]:
        return (self.K, self.C // self.G, self.KH, self.KW)

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.K, self.OH, self.OW)

    def flops(self) -> int:
        """2 x multiply-adds of the forward pass (backward data and filter cost the same)."""
        return 2 * self.N * self.K * self.OH * self.OW * self.CG * self.KH * self.KW


class PoolGeom(NamedTuple):
    """Normalised geometry of one 2-D pooling window sweep (symmetric padding ``ph``, ``pw``)."""

    N: int
    C: int
    H: int
    W: int
    KH: int
    KW: int
    OH: int
    OW: int
    sh: int
    sw: int
    ph: int
    pw: int
    count_include_pad: bool = True

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.OH, self.OW)


# --------------------------------------------------------------------------- small normalisers


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def pair(op: str, name: str, value: Any, *, minimum: int) -> tuple[int, int]:
    """``3`` -> ``(3, 3)``; ``(2, 1)`` -> ``(2, 1)``; anything else or below ``minimum`` raises."""
    if _is_int(value):
        vals = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        vals = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints; got {value!r}")
    if min(vals) < minimum:
        rule = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{op}: {name} must be {rule}; got {name}={value!r}")
    return vals


def out_size(size: int, k: int, stride: int, pad_lo: int, pad_hi: int, dilation: int = 1) -> int:
    """PyTorch's floor-mode output size: floor((size + pads - dilation*(k-1) - 1) / stride) + 1."""
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def is_device_array(a: Any) -> bool:
    """True for numba device arrays (the simulator's too) and anything exposing
    ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors)."""
    if isinstance(a, np.ndarray):
        return False
    return bool(getattr(type(a), "__cuda_ndarray__", False)) or hasattr(
        a, "__cuda_array_interface__"
    )


def _shape_of(a: Any) -> tuple[int, ...]:
    if type(a) is np.ndarray:  # already a tuple of Python ints (0.1 us instead of 0.4)
        return a.shape
    return tuple(int(s) for s in a.shape)


def check_array(op: str, name: str, a: Any, ndim: int, layout: str) -> Any:
    """Check type, rank and dtype of one input; return a C-contiguous native-byte-order view/copy.

    Non-contiguous or byte-swapped NumPy inputs are accepted and converted (a copy), so the
    kernels only ever see contiguous native arrays. Device arrays are returned as they are
    (the CUDA backend makes them contiguous itself).
    """
    if (  # the common case, checked first: it is most of the per-call cost of a small op
        type(a) is np.ndarray
        and a.ndim == ndim
        and a.dtype in _NATIVE_FLOATS
        and a.flags.c_contiguous
    ):
        return a
    if isinstance(a, np.ndarray):
        arr = a
    elif is_device_array(a):
        arr = a
    else:
        raise TypeError(
            f"{op}: {name} must be a NumPy array or a CUDA device array; got {type(a).__name__}"
        )
    dtype = dtype_of(arr)
    if dtype.newbyteorder("=") not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32 or float64; got dtype {dtype} "
            f"(convert with {name}.astype(np.float32))"
        )
    if len(arr.shape) != ndim:
        raise ValueError(
            f"{op}: {name} must be {ndim}-D {layout}; got {len(arr.shape)}-D "
            f"{name}.shape={_shape_of(arr)}"
        )
    if isinstance(arr, np.ndarray):
        if not dtype.isnative:
            arr = arr.astype(dtype.newbyteorder("="))
        arr = np.ascontiguousarray(arr)
    return arr


def dtype_of(a: Any) -> np.dtype:
    """NumPy dtype of a host or device array (PyTorch tensors carry torch dtypes: read the
    CUDA array interface's typestr instead)."""
    if isinstance(a, np.ndarray):
        return a.dtype
    try:
        return np.dtype(a.dtype)
    except TypeError:
        return np.dtype(a.__cuda_array_interface__["typestr"])


def check_same_dtype(op: str, **arrays: Any) -> None:
    dts = {v.dtype if type(v) is np.ndarray else None for v in arrays.values() if v is not None}
    if len(dts) == 1 and None not in dts:
        return  # host arrays of one dtype (byte order differs only after conversion)
    items = [(k, dtype_of(v).newbyteorder("=")) for k, v in arrays.items() if v is not None]
    if len({d for _, d in items}) > 1:
        desc = ", ".join(f"{k}.dtype={d}" for k, d in items)
        raise TypeError(f"{op}: all inputs must have the same dtype; got {desc}")


def check_same_place(op: str, **arrays: Any) -> None:
    if all(v is None or type(v) is np.ndarray for v in arrays.values()):
        return
    places = {k: is_device_array(v) for k, v in arrays.items() if v is not None}
    if len(set(places.values())) > 1:
        desc = ", ".join(f"{k} on {'device' if d else 'host'}" for k, d in places.items())
        raise TypeError(f"{op}: inputs must all be host (NumPy) or all device arrays; got {desc}")


def check_like_x(op: str, name: str, a: Any, x: Any) -> Any:
    """``a``, a 4-D array of x's shape, dtype and place (an op's second activation input)."""
    a = check_array(op, name, a, 4, "(N, C, H, W)")
    if _shape_of(a) != _shape_of(x):
        raise ValueError(
            f"{op}: {name} must have x's shape {_shape_of(x)}; got {name}.shape={_shape_of(a)}"
        )
    check_same_dtype(op, x=x, **{name: a})
    check_same_place(op, x=x, **{name: a})
    return a


def _check_nonempty(op: str, name: str, shape: tuple[int, ...]) -> None:
    if shape[0] == 0:
        raise ValueError(f"{op}: empty batch (N=0) is not supported; {name}.shape={shape}")
    if min(shape) == 0:
        raise ValueError(f"{op}: {name} has a zero-sized dimension; {name}.shape={shape}")


# --------------------------------------------------------------------------- convolution


def _conv2d_geometry(
    op: str,
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: Any = 1,
) -> ConvGeom:
    """Validate convolution arguments against the shapes and return the normalised geometry."""
    x_shape, w_shape = tuple(int(s) for s in x_shape), tuple(int(s) for s in w_shape)
    if len(x_shape) != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W); got x.shape={x_shape}")
    if len(w_shape) != 4:
        raise ValueError(
            f"{op}: weight must be 4-D (K, C/groups, KH, KW); got weight.shape={w_shape}"
        )
    _check_nonempty(op, "x", x_shape)
    if min(w_shape) == 0:
        raise ValueError(f"{op}: weight has a zero-sized dimension; weight.shape={w_shape}")
    sh, sw = pair(op, "stride", stride, minimum=1)
    dh, dw = pair(op, "dilation", dilation, minimum=1)
    if not _is_int(groups):
        raise TypeError(f"{op}: groups must be an int; got {groups!r}")
    G = int(groups)
    N, C, H, W = x_shape
    K, CG, KH, KW = w_shape
    shapes = f"x.shape={x_shape}, weight.shape={w_shape}"
    if G < 1:
        raise ValueError(f"{op}: groups must be positive; got groups={G}")
    if C % G != 0:
        raise ValueError(f"{op}: groups={G} must divide the {C} input channels; {shapes}")
    if K % G != 0:
        raise ValueError(f"{op}: groups={G} must divide the {K} output channels; {shapes}")
    if CG * G != C:
        raise ValueError(
            f"{op}: x has {C} channels but weight expects {CG * G} "
            f"({CG} per group x groups={G}); {shapes}"
        )
    ekh, ekw = dh * (KH - 1) + 1, dw * (KW - 1) + 1  # effective (dilated) kernel extent
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if (sh, sw) != (1, 1):
                raise ValueError(
                    f"{op}: padding='same' needs stride 1 (as in PyTorch); got stride={(sh, sw)}"
                )
            # PyTorch puts the odd pixel of an even effective kernel on the bottom/right.
            th, tw = ekh - 1, ekw - 1
            pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            raise ValueError(
                f"{op}: padding must be an int, a pair, 'same' or 'valid'; got {padding!r}"
            )
    else:
        ph, pw = pair(op, "padding", padding, minimum=0)
        pads = (ph, ph, pw, pw)
    pt, pb, pl, pr = pads
    if ekh > H + pt + pb or ekw > W + pl + pr:
        raise ValueError(
            f"{op}: the dilated kernel ({ekh}x{ekw}) is larger than the padded input "
            f"({H + pt + pb}x{W + pl + pr}); {shapes}, padding={padding!r}, dilation={(dh, dw)}"
        )
    OH, OW = out_size(H, KH, sh, pt, pb, dh), out_size(W, KW, sw, pl, pr, dw)
    return ConvGeom(N, C, H, W, K, KH, KW, OH, OW, G, sh, sw, pt, pl, dh, dw)


def _memo(fn):
    """``fn`` remembered per argument tuple: geometry is pure arithmetic on shapes and
    arguments, and a training step asks for the same ones every step (~5 us each). Arguments
    that cannot be hashed (a list for a stride) skip the memo; errors are never remembered."""
    cached = functools.lru_cache(maxsize=4096)(fn)

    def call(*args, **kwargs):
        if kwargs:
            return fn(*args, **kwargs)
        try:
            return cached(*args)
        except TypeError as e:
            if "unhashable" not in str(e):
                raise
            return fn(*args)

    call.__doc__, call.__wrapped__ = fn.__doc__, fn
    return call


conv2d_geometry = _memo(_conv2d_geometry)


def check_conv2d(op, x, weight, bias, stride, padding, dilation, groups):
    """Validate a forward convolution call; return (x, weight, bias, geometry)."""
    x = check_array(op, "x", x, 4, "(N, C, H, W)")
    weight = check_array(op, "weight", weight, 4, "(K, C/groups, KH, KW)")
    if bias is not None:
        bias = check_array(op, "bias", bias, 1, "(K,)")
    check_same_dtype(op, x=x, weight=weight, bias=bias)
    check_same_place(op, x=x, weight=weight, bias=bias)
    g = conv2d_geometry(op, _shape_of(x), _shape_of(weight), stride, padding, dilation, groups)
    if bias is not None and _shape_of(bias) != (g.K,):
        raise ValueError(
            f"{op}: bias must have shape ({g.K},) (one per output channel); "
            f"got bias.shape={_shape_of(bias)}"
        )
    return x, weight, bias, g


def check_grad(op: str, grad_y: Any, expected: tuple[int, ...], what: str) -> Any:
    grad_y = check_array(op, "grad_y", grad_y, 4, "(N, K, OH, OW)")
    if _shape_of(grad_y) != tuple(expected):
        raise ValueError(
            f"{op}: grad_y must have the {what} output shape {tuple(expected)}; "
            f"got grad_y.shape={_shape_of(grad_y)}"
        )
    return grad_y


def shape_tuple(op: str, name: str, shape: Any) -> tuple[int, int, int, int]:
    if not (
        isinstance(shape, (tuple, list)) and len(shape) == 4 and all(_is_int(s) for s in shape)
    ):
        raise TypeError(f"{op}: {name} must be a tuple of 4 ints; got {shape!r}")
    return tuple(int(s) for s in shape)


# --------------------------------------------------------------------------- pooling


def _pool2d_geometry(
    op: str,
    x_shape: tuple[int, ...],
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> PoolGeom:
    """Validate pooling arguments (PyTorch's rules) and return the normalised geometry."""
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W); got x.shape={x_shape}")
    _check_nonempty(op, "x", x_shape)
    KH, KW = pair(op, "kernel_size", kernel_size, minimum=1)
    sh, sw = (KH, KW) if stride is None else pair(op, "stride", stride, minimum=1)
    if isinstance(padding, str):
        raise ValueError(f"{op}: padding must be an int or a pair of ints; got {padding!r}")
    ph, pw = pair(op, "padding", padding, minimum=0)
    if 2 * ph > KH or 2 * pw > KW:
        raise ValueError(
            f"{op}: padding must be at most half the kernel size; "
            f"got padding={(ph, pw)}, kernel_size={(KH, KW)}"
        )
    N, C, H, W = x_shape
    if KH > H + 2 * ph or KW > W + 2 * pw:
        raise ValueError(
            f"{op}: kernel_size {(KH, KW)} is larger than the padded input "
            f"({H + 2 * ph}x{W + 2 * pw}); x.shape={x_shape}, padding={(ph, pw)}"
        )

    def size(n: int, k: int, s: int, p: int) -> int:
        if not ceil_mode:
            return (n + 2 * p - k) // s + 1
        o = -(-(n + 2 * p - k) // s) + 1
        if (o - 1) * s >= n + p:  # PyTorch: the last window must start inside input or left pad
            o -= 1
        return o

    OH, OW = size(H, KH, sh, ph), size(W, KW, sw, pw)
    return PoolGeom(N, C, H, W, KH, KW, OH, OW, sh, sw, ph, pw, bool(count_include_pad))


pool2d_geometry = _memo(_pool2d_geometry)


def check_pool2d(op, x, kernel_size, stride, padding, ceil_mode=False, count_include_pad=True):
    """Validate a pooling call; return (x, geometry)."""
    x = check_array(op, "x", x, 4, "(N, C, H, W)")
    g = pool2d_geometry(
        op, _shape_of(x), kernel_size, stride, padding, ceil_mode, count_include_pad
    )
    return x, g


def conv_transpose2d_geometry(
    op, x_shape, w_shape, stride, padding, output_padding, dilation, groups
):
    """Geometry of the convolution whose backward-data pass is this transposed convolution.

    x (N, C_in, H, W) and weight (C_in, C_out/G, KH, KW) as in PyTorch; the output
    (N, C_out, OH, OW) has OH = (H-1)*sh - 2*ph + dh*(KH-1) + oph + 1. In the returned geometry
    the roles are those of the forward conv: its "x" is our output, its "y" is our input.
    """
    x_shape, w_shape = tuple(int(s) for s in x_shape), tuple(int(s) for s in w_shape)
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise ValueError(
            f"{op}: x must be 4-D (N, C_in, H, W) and weight 4-D (C_in, C_out/groups, KH, KW); "
            f"got x.shape={x_shape}, weight.shape={w_shape}"
        )
    if isinstance(padding, str):
        raise ValueError(f"{op}: padding must be an int or a pair of ints; got {padding!r}")
    _check_nonempty(op, "x", x_shape)
    sh, sw = pair(op, "stride", stride, minimum=1)
    dh, dw = pair(op, "dilation", dilation, minimum=1)
    ph, pw = pair(op, "padding", padding, minimum=0)
    oph, opw = pair(op, "output_padding", output_padding, minimum=0)
    if oph >= sh or opw >= sw:
        raise ValueError(
            f"{op}: output_padding must be smaller than stride; "
            f"got output_padding={(oph, opw)}, stride={(sh, sw)}"
        )
    if not _is_int(groups) or int(groups) < 1:
        raise ValueError(f"{op}: groups must be a positive int; got {groups!r}")
    N, Cin, H, W = x_shape
    if w_shape[0] != Cin:
        raise ValueError(
            f"{op}: x has {Cin} channels but weight.shape[0] is {w_shape[0]} (weight is "
            f"(C_in, C_out/groups, KH, KW)); x.shape={x_shape}, weight.shape={w_shape}"
        )
    OH = (H - 1) * sh - 2 * ph + dh * (w_shape[2] - 1) + oph + 1
    OW = (W - 1) * sw - 2 * pw + dw * (w_shape[3] - 1) + opw + 1
    if OH < 1 or OW < 1:
        raise ValueError(
            f"{op}: the output would be empty ({OH}x{OW}); x.shape={x_shape}, "
            f"weight.shape={w_shape}, stride={(sh, sw)}, padding={(ph, pw)}"
        )
    C_out = w_shape[1] * int(groups)
    g = conv2d_geometry(op, (N, C_out, OH, OW), w_shape, (sh, sw), (ph, pw), (dh, dw), groups)
    assert (g.OH, g.OW) == (H, W), (g, x_shape)
    return g


# --------------------------------------------------------------------------- layers' other math
# Checks for activations, linear, losses, dropout, batch norm and optimizer updates. Same rules as
# above: shapes and dtypes only, except that host label arrays are range-checked (a wrong label
# would otherwise index out of bounds in a kernel).

INT_KINDS = ("i", "u")


def check_float(op: str, name: str, a: Any) -> Any:
    """A float32/float64 array of any rank (elementwise ops), made C-contiguous on the host."""
    if not (isinstance(a, np.ndarray) or is_device_array(a)):
        raise TypeError(
            f"{op}: {name} must be a NumPy array or a CUDA device array; got {type(a).__name__}"
        )
    return check_array(op, name, a, len(a.shape), "array")


def check_same_shape(op: str, **arrays: Any) -> None:
    items = [(k, _shape_of(v)) for k, v in arrays.items() if v is not None]
    if len({s for _, s in items}) > 1:
        desc = ", ".join(f"{k}.shape={s}" for k, s in items)
        raise ValueError(f"{op}: inputs must have the same shape; got {desc}")


def check_elementwise(op: str, **arrays: Any) -> list:
    """Float arrays of one shape, dtype and placement; returned in the order given."""
    out = {k: check_float(op, k, v) for k, v in arrays.items()}
    check_same_dtype(op, **out)
    check_same_place(op, **out)
    check_same_shape(op, **out)
    return list(out.values())


def check_number(
    op: str,
    name: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """A real number inside [lo, hi] (open ends where asked); returns it as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{op}: {name} must be a number; got {value!r}")
    v = float(value)
    bad = not np.isfinite(v)
    if lo is not None:
        bad = bad or (v <= lo if lo_open else v < lo)
    if hi is not None:
        bad = bad or (v >= hi if hi_open else v > hi)
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ValueError(
            f"{op}: {name} must be in {left}{lo_s}, {hi_s}{right}; got {name}={value!r}"
        )
    return v


def check_linear(op: str, x: Any, weight: Any, bias: Any) -> tuple[Any, Any, Any]:
    """Validate ``linear`` operands: x (N, F), weight (O, F), bias (O,) or None."""
    x = check_array(op, "x", x, 2, "(N, in_features)")
    weight = check_array(op, "weight", weight, 2, "(out_features, in_features)")
    if bias is not None:
        bias = check_array(op, "bias", bias, 1, "(out_features,)")
    check_same_dtype(op, x=x, weight=weight, bias=bias)
    check_same_place(op, x=x, weight=weight, bias=bias)
    xs, ws = _shape_of(x), _shape_of(weight)
    if xs[0] == 0:
        raise ValueError(f"{op}: empty batch (N=0) is not supported; x.shape={xs}")
    if xs[1] != ws[1]:
        raise ValueError(
            f"{op}: x has {xs[1]} features but weight expects {ws[1]}; "
            f"x.shape={xs}, weight.shape={ws}"
        )
    if bias is not None and _shape_of(bias) != (ws[0],):
        raise ValueError(
            f"{op}: bias must have shape ({ws[0]},) (one per output feature); "
            f"got bias.shape={_shape_of(bias)}"
        )
    return x, weight, bias


def check_linear_grad(op: str, grad_y: Any, x: Any, weight: Any) -> tuple[Any, Any, Any]:
    x, weight, _ = check_linear(op, x, weight, None)
    grad_y = check_array(op, "grad_y", grad_y, 2, "(N, out_features)")
    expected = (_shape_of(x)[0], _shape_of(weight)[0])
    if _shape_of(grad_y) != expected:
        raise ValueError(
            f"{op}: grad_y must have the linear output shape {expected}; "
            f"got grad_y.shape={_shape_of(grad_y)}"
        )
    check_same_dtype(op, grad_y=grad_y, x=x)
    check_same_place(op, grad_y=grad_y, x=x)
    return grad_y, x, weight


def check_labels(op: str, logits: Any, labels: Any) -> tuple[Any, Any]:
    """logits (N, classes) float; labels (N,) integers in [0, classes), same placement.

    Host labels are range-checked (device labels cannot be read without a copy).
    """
    logits = check_array(op, "logits", logits, 2, "(N, classes)")
    if not (isinstance(labels, np.ndarray) or is_device_array(labels)):
        raise TypeError(
            f"{op}: labels must be a NumPy array or a CUDA device array of ints; "
            f"got {type(labels).__name__}"
        )
    if np.dtype(labels.dtype).kind not in INT_KINDS:
        raise TypeError(f"{op}: labels must be integers (class indices); got dtype {labels.dtype}")
    n, classes = _shape_of(logits)
    if n == 0:
        raise ValueError(f"{op}: empty batch (N=0) is not supported; logits.shape={(n, classes)}")
    if _shape_of(labels) != (n,):
        raise ValueError(
            f"{op}: labels must have shape ({n},) (one class index per row of logits); "
            f"got labels.shape={_shape_of(labels)}, logits.shape={(n, classes)}"
        )
    check_same_place(op, logits=logits, labels=labels)
    if isinstance(labels, np.ndarray):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= classes:
            raise ValueError(
                f"{op}: labels must be in [0, {classes}) for {classes} classes; "
                f"got values from {lo} to {hi}"
            )
        labels = np.ascontiguousarray(labels, dtype=np.int64)
    return logits, labels


def check_keep_mask(op: str, keep_mask: Any, x: Any) -> Any:
    """Dropout mask: bool or x's dtype, x's shape and placement."""
    if not (isinstance(keep_mask, np.ndarray) or is_device_array(keep_mask)):
        raise TypeError(
            f"{op}: keep_mask must be a NumPy array or a CUDA device array; "
            f"got {type(keep_mask).__name__}"
        )
    dt = np.dtype(keep_mask.dtype)
    if dt != np.dtype(bool) and dt != np.dtype(x.dtype):
        raise TypeError(
            f"{op}: keep_mask must be bool or the dtype of x ({x.dtype}); got dtype {dt}"
        )
    if _shape_of(keep_mask) != _shape_of(x):
        raise ValueError(
            f"{op}: keep_mask must have the shape of x; "
            f"got keep_mask.shape={_shape_of(keep_mask)}, x.shape={_shape_of(x)}"
        )
    check_same_place(op, x=x, keep_mask=keep_mask)
    if isinstance(keep_mask, np.ndarray):
        keep_mask = np.ascontiguousarray(keep_mask)
    return keep_mask


def check_channel_vectors(op: str, x: Any, **vectors: Any) -> dict:
    """Per-channel vectors (C,) beside x (N, C, H, W): dtype, placement and shape."""
    C = _shape_of(x)[1]
    out = {}
    for name, v in vectors.items():
        if v is None:
            out[name] = None
            continue
        v = check_array(op, name, v, 1, "(C,)")
        if _shape_of(v) != (C,):
            raise ValueError(
                f"{op}: {name} must have shape ({C},) (one per channel of x); "
                f"got {name}.shape={_shape_of(v)}, x.shape={_shape_of(x)}"
            )
        out[name] = v
    check_same_dtype(op, x=x, **out)
    check_same_place(op, x=x, **out)
    return out


def check_batch_norm2d(op: str, x: Any, training: bool, running_mean: Any, running_var: Any) -> Any:
    x = check_array(op, "x", x, 4, "(N, C, H, W)")
    xs = _shape_of(x)
    _check_nonempty(op, "x", xs)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError(f"{op}: evaluation mode needs running_mean and running_var")
    if training and xs[0] * xs[2] * xs[3] == 1:
        raise ValueError(
            f"{op}: training needs more than one value per channel to compute a variance; "
            f"x.shape={xs}"
        )
    return x


def check_update(op: str, p: Any, grad: Any, **state: Any) -> Any:
    """Optimizer-update operands: float arrays of one shape, dtype and placement.

    ``p`` and the state arrays are updated in place, so on the host they must already be
    writeable, C-contiguous and native (a converted copy would silently swallow the update).
    Returns grad (made contiguous if needed).
    """
    state = {k: v for k, v in state.items() if v is not None}
    _, grad, *_ = check_elementwise(op, p=p, grad=grad, **state)
    for name, a in [("p", p), *state.items()]:
        if isinstance(a, np.ndarray) and not (
            a.flags.c_contiguous and a.flags.writeable and a.dtype.isnative
        ):
            raise ValueError(
                f"{op}: {name} is updated in place and must be a writeable, C-contiguous, "
                f"native-byte-order array"
            )
    return grad


def fit_for_update(p: Any, grad: Any, buf: Any = None) -> bool:
    """The common case of ``check_update``, checked in a few attribute reads: host arrays of
    one float dtype and shape, p and buf (when given) writeable, C-contiguous and native, grad
    C-contiguous. False means: run ``check_update`` (which raises, or converts grad)."""
    t = np.ndarray
    if not (type(p) is t and type(grad) is t and (buf is None or type(buf) is t)):
        return False
    dt = p.dtype
    if dt.type not in (np.float32, np.float64) or grad.dtype != dt or grad.shape != p.shape:
        return False
    pf, gf = p.flags, grad.flags
    if not (pf.c_contiguous and pf.writeable and gf.c_contiguous and dt.isnative):
        return False
    if buf is None:
        return True
    bf = buf.flags
    return buf.dtype == dt and buf.shape == p.shape and bf.c_contiguous and bf.writeable


def check_step(op: str, step: Any) -> int:
    """An optimizer's update count, from 1 (this update included)."""
    if not _is_int(step) or step < 1:
        raise ValueError(
            f"{op}: step must be an int >= 1 (updates so far, this one included); got step={step!r}"
        )
    return int(step)


def single(op: str, name: str, value: Any, *, minimum: int) -> int:
    """A 1-D size: ``3`` or ``(3,)`` -> ``3``; anything else or below ``minimum`` raises."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not _is_int(value):
        raise TypeError(f"{op}: {name} must be an int or a 1-tuple of ints; got {value!r}")
    return pair(op, name, value, minimum=minimum)[0]


# --------------------------------------------------------------------------- tensor ops


def check_any_array(op: str, name: str, a: Any) -> Any:
    """A host or device array of any dtype and rank (views: reshape, indexing, moves)."""
    if not (isinstance(a, np.ndarray) or is_device_array(a)):
        raise TypeError(
            f"{op}: {name} must be a NumPy array, a CUDA device array or a Tensor; "
            f"got {type(a).__name__}"
        )
    return a


def check_dim(op: str, dim: Any, ndim: int) -> int:
    """One axis, negative counting from the end, as PyTorch's ``dim``."""
    if not _is_int(dim):
        raise TypeError(f"{op}: dim must be an int; got {dim!r}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{op}: dim={dim} is out of range for a {ndim}-D input")
    return int(dim) % ndim


def check_axes(op: str, axis: Any, ndim: int) -> tuple[int, ...]:
    """None (every axis), an int or a tuple of ints, normalised, sorted, no repeats."""
    if axis is None:
        return tuple(range(ndim))
    items = axis if isinstance(axis, (tuple, list)) else (axis,)
    axes = tuple(sorted(check_dim(op, a, max(ndim, 1)) for a in items))
    if len(set(axes)) != len(axes):
        raise ValueError(f"{op}: axis {axis!r} repeats an axis")
    return axes


def _broadcast(op: str, a: tuple, b: tuple) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in np.broadcast_shapes(a, b))
    except ValueError:
        raise ValueError(
            f"{op}: shapes {a} and {b} do not broadcast (sizes must match or be 1, "
            "aligned from the last axis)"
        ) from None


def check_binary(op: str, a: Any, b: Any) -> tuple[Any, Any]:
    """Two float operands of one dtype and placement whose shapes broadcast. A Python number
    becomes a 0-d array of the other operand's dtype, where it is."""
    a_num = isinstance(a, (int, float, np.number)) and not isinstance(a, (bool, np.bool_))
    b_num = isinstance(b, (int, float, np.number)) and not isinstance(b, (bool, np.bool_))
    if a_num and b_num:
        raise TypeError(f"{op}: at least one operand must be an array or a Tensor")
    if b_num:
        b = _number_like(b, check_float(op, "a", a))
    elif a_num:
        a = _number_like(a, check_float(op, "b", b))
    a, b = check_float(op, "a", a), check_float(op, "b", b)
    check_same_dtype(op, a=a, b=b)
    check_same_place(op, a=a, b=b)
    _broadcast(op, _shape_of(a), _shape_of(b))
    return a, b


def _number_like(v: Any, like: Any) -> Any:
    out = np.full((1,) if is_device_array(like) else (), v, dtype=dtype_of(like))
    if is_device_array(like):
        from numba import cuda

        return cuda.to_device(out)
    return out


def check_matmul(op: str, a: Any, b: Any) -> tuple[Any, Any]:
    a = check_array(op, "a", a, 2, "(n, k)")
    b = check_array(op, "b", b, 2, "(k, m)")
    check_same_dtype(op, a=a, b=b)
    check_same_place(op, a=a, b=b)
    if _shape_of(a)[1] != _shape_of(b)[0]:
        raise ValueError(
            f"{op}: inner sizes differ: a.shape={_shape_of(a)}, b.shape={_shape_of(b)}"
        )
    return a, b


def check_reshape(op: str, shape: tuple[int, ...], new: Any) -> tuple[int, ...]:
    """``new`` with at most one -1 resolved; the element counts must agree."""
    if _is_int(new):
        new = (new,)
    if not isinstance(new, (tuple, list)) or not all(_is_int(s) for s in new):
        raise TypeError(f"{op}: shape must be a tuple of ints; got {new!r}")
    new = [int(s) for s in new]
    size = math.prod(shape)
    if new.count(-1) > 1 or any(s < -1 for s in new):
        raise ValueError(f"{op}: shape {tuple(new)} may hold at most one -1 and no other negative")
    if -1 in new:
        rest = math.prod(s for s in new if s != -1)
        if rest == 0 or size % rest:
            raise ValueError(f"{op}: cannot reshape {shape} ({size} elements) to {tuple(new)}")
        new[new.index(-1)] = size // rest
    if math.prod(new) != size:
        raise ValueError(f"{op}: cannot reshape {shape} ({size} elements) to {tuple(new)}")
    return tuple(new)


def check_basic_index(op: str, index: Any, shape: tuple[int, ...]) -> Any:
    """Basic indexing only (ints, slices, Ellipsis, None): results are views whose gradient
    scatters back. Integer indices must be in range (a device array would not check)."""
    items = index if isinstance(index, tuple) else (index,)
    axis = 0
    for it in items:
        if it is None or it is Ellipsis:
            if it is Ellipsis:
                axis = len(shape) - sum(1 for j in items if j is not None and j is not Ellipsis)
            continue
        if isinstance(it, slice):
            for part in (it.start, it.stop, it.step):
                if part is not None and not _is_int(part):
                    raise TypeError(f"{op}: slice bounds must be ints; got {it!r}")
            if it.step is not None and it.step <= 0:
                raise ValueError(f"{op}: slice steps must be positive; got {it!r}")
        elif _is_int(it):
            if axis >= len(shape) or not -shape[axis] <= it < shape[axis]:
                size = shape[axis] if axis < len(shape) else 0
                raise IndexError(f"{op}: index {it} is out of range for an axis of size {size}")
        else:
            raise TypeError(
                f"{op}: only basic indexing (ints, slices, ..., None) is supported; "
                f"got {type(it).__name__}"
            )
        axis += 1
    if axis > len(shape):
        raise IndexError(f"{op}: too many indices for a {len(shape)}-D input")
    return index


def check_cat(op: str, arrays: Any, dim: Any) -> tuple[list, int]:
    """One or more float arrays of one dtype and placement, equal except along ``dim``."""
    arrays = list(arrays)
    if not arrays:
        raise ValueError(f"{op}: needs at least one input")
    arrays = [check_float(op, f"tensors[{i}]", a) for i, a in enumerate(arrays)]
    check_same_dtype(op, **{f"tensors[{i}]": a for i, a in enumerate(arrays)})
    check_same_place(op, **{f"tensors[{i}]": a for i, a in enumerate(arrays)})
    first = _shape_of(arrays[0])
    d = check_dim(op, dim, len(first))
    for i, a in enumerate(arrays[1:], 1):
        s = _shape_of(a)
        if len(s) != len(first) or s[:d] + s[d + 1 :] != first[:d] + first[d + 1 :]:
            raise ValueError(
                f"{op}: tensors must have the same shape except along dim {d}; got "
                f"tensors[0].shape={first}, tensors[{i}].shape={s}"
            )
    return arrays, d
