"""Tensor and the define-by-run tape: ``backward``, ``no_grad``, ``gradcheck``.

A Tensor wraps one array (NumPy on the host, a numba device array on the GPU). Every op of
``fastconv.functional`` given a Tensor that requires a gradient records one ``Node`` on the
result: the op's backward function, the typed context its forward returned and the input
Tensors. ``loss.backward()`` sorts the nodes reachable from ``loss`` topologically, runs them
in reverse order once each, sums the gradients that meet at a Tensor, accumulates into the
``.grad`` of leaves (Tensors made by the user, Parameters) and drops every context as soon as
its node has run (a second backward through the same graph is an error, as in PyTorch).
The order is a function of the graph alone, so results are the same bits run to run.

Gradient rule of each op: next to its forward, in ``fastconv.ops``.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from . import _device, shapes

Array = Any

_state = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside the block, ops record nothing (inference, optimizer updates); thread-local."""
    before = is_grad_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = before


@contextlib.contextmanager
def enable_grad() -> Iterator[None]:
    before = is_grad_enabled()
    _state.enabled = True
    try:
        yield
    finally:
        _state.enabled = before


_FREED = object()  # a node's context after its backward ran


class Node:
    """One recorded op: ``backward(grad_out, ctx, needs)`` -> one gradient (or None) per input.

    ``needs[i]`` says whether input i wants a gradient, so kernels skip the work for data
    inputs (the first convolution's grad_x, labels, running statistics).
    """

    __slots__ = ("name", "backward", "ctx", "inputs", "needs", "release")

    def __init__(self, name, backward, ctx, inputs, needs, release=None):
        self.name = name
        self.backward = backward
        self.ctx = ctx
        self.inputs = inputs
        self.needs = needs
        self.release = release  # release(ctx) once the context is freed: buffers for reuse


def _as_array(data: Any, dtype: Any, op: str) -> Array:
    if isinstance(data, Tensor):
        data = data.data
    if shapes.is_device_array(data):
        if dtype is not None and np.dtype(dtype) != np.dtype(data.dtype):
            raise TypeError(f"{op}: a device array cannot change dtype on the way in")
        return data
    if hasattr(data, "detach") and hasattr(data, "numpy"):  # a torch tensor
        data = data.detach().cpu().numpy()
    return np.asarray(data, dtype=dtype)


class Tensor:
    """An array with an optional gradient and the op that made it.

    Args:
        data: a NumPy array (or anything ``np.asarray`` takes), a numba device array or any
            ``__cuda_array_interface__`` object (kept on the GPU, zero-copy), or a Tensor.
        requires_grad: whether ``backward`` computes ``.grad`` for it (floating dtypes only).
        dtype: cast host data to this dtype.
    """

    __slots__ = ("data", "grad", "requires_grad", "_node", "__weakref__")
    __array_priority__ = 1000  # ndarray + Tensor -> Tensor.__radd__

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None) -> None:
        self.data = _as_array(data, dtype, "Tensor")
        self.grad: Array | None = None
        self._node: Node | None = None
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    @classmethod
    def _make(cls, data: Array, node: Node | None) -> Tensor:
        """A Tensor around an op's result (no conversion, no checks: the hot path)."""
        t = object.__new__(cls)
        t.data, t.grad, t._node = data, None, node
        t.requires_grad = node is not None
        return t

    # ---- what it is
    @property
    def shape(self) -> tuple[int, ...]:
        return shapes._shape_of(self.data)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def ndim(self) -> int:
        return len(self.data.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # Python ints: exact, and ~10x faster than np.prod

    def numel(self) -> int:
        return self.size

    @property
    def device(self) -> str:
        return "cuda" if shapes.is_device_array(self.data) else "cpu"

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    @property
    def grad_fn(self) -> str | None:
        """The name of the op that made this Tensor (None for a leaf)."""
        return None if self._node is None else self._node.name

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        extra = ""
        if self.device != "cpu":
            extra += f", device='{self.device}'"
        if self._node is not None:
            extra += f", grad_fn=<{self._node.name}>"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        body = np.array2string(self.numpy(), separator=", ", prefix="tensor(", threshold=20)
        return f"tensor({body}, dtype={self.dtype.name}{extra})"

    # ---- conversions
    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (a copy from the GPU; the very array on the host)."""
        return _device.to_host(self.data)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def item(self) -> float | int:
        if self.size != 1:
            raise ValueError(f"item: only a one-element Tensor has an item; shape={self.shape}")
        return self.numpy().reshape(()).item()

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __bool__(self) -> bool:
        return bool(self.item())

    def tolist(self) -> Any:
        return self.numpy().tolist()

    def detach(self) -> Tensor:
        """The same data, cut from the graph (no gradient flows back through it)."""
        return Tensor._make(self.data, None)

    def to(self, target: Any) -> Tensor:
        """A copy on "cpu" | "cuda" or cast to a float dtype; recorded (the gradient moves back).
        Returns self when nothing changes."""
        from . import functional as F

        return F.to(self, target)

    def cpu(self) -> Tensor:
        return self.to("cpu")

    def cuda(self) -> Tensor:
        return self.to("cuda")

    def requires_grad_(self, mode: bool = True) -> Tensor:
        if mode and self.dtype not in shapes.FLOAT_DTYPES:
            raise TypeError(
                f"requires_grad: only float32/float64 Tensors can require a gradient; "
                f"got dtype {self.dtype}"
            )
        if not mode and self._node is not None:
            raise RuntimeError(
                "requires_grad_(False): this Tensor is the result of an op; use .detach()"
            )
        self.requires_grad = bool(mode)
        return self

    # ---- the tape
    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Gradients of this Tensor with respect to every leaf that requires one, accumulated
        into their ``.grad``. ``grad``: the gradient of some scalar with respect to this Tensor
        (default 1 for a one-element Tensor; required otherwise)."""
        backward(self, grad, retain_graph=retain_graph)

    # ---- operators (fastconv.functional does the work)
    def __add__(self, other: Any) -> Tensor:
        from .functional import add

        return add(self, other)

    def __radd__(self, other: Any) -> Tensor:
        from .functional import add

        return add(other, self)

    def __sub__(self, other: Any) -> Tensor:
        from .functional import sub

        return sub(self, other)

    def __rsub__(self, other: Any) -> Tensor:
        from .functional import sub

        return sub(other, self)

    def __mul__(self, other: Any) -> Tensor:
        from .functional import mul

        return mul(self, other)

    def __rmul__(self, other: Any) -> Tensor:
        from .functional import mul

        return mul(other, self)

    def __truediv__(self, other: Any) -> Tensor:
        from .functional import div

        return div(self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        from .functional import div

        return div(other, self)

    def __neg__(self) -> Tensor:
        from .functional import mul

        return mul(self, -1.0)

    def __matmul__(self, other: Any) -> Tensor:
        from .functional import matmul

        return matmul(self, other)

    def __rmatmul__(self, other: Any) -> Tensor:
        from .functional import matmul

        return matmul(other, self)

    def __getitem__(self, index: Any) -> Tensor:
        from .functional import getitem

        return getitem(self, index)

    def reshape(self, *shape: Any) -> Tensor:
        from .functional import reshape

        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return reshape(self, shape)

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Tensor:
        from .functional import flatten

        return flatten(self, start_dim, end_dim)

    def sum(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        from .functional import sum as _sum

        return _sum(self, axis, keepdims)

    def mean(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        from .functional import mean

        return mean(self, axis, keepdims)

    def relu(self) -> Tensor:
        from .functional import relu

        return relu(self)

    def softmax(self, dim: int) -> Tensor:
        from .functional import softmax

        return softmax(self, dim)

    def log_softmax(self, dim: int) -> Tensor:
        from .functional import log_softmax

        return log_softmax(self, dim)

    def argmax(self, axis: int | None = None) -> np.ndarray:
        """Index of the largest value (a NumPy result: not differentiable)."""
        return np.argmax(self.numpy(), axis=axis)

    @property
    def T(self) -> Tensor:
        from .functional import transpose

        return transpose(self)


def record(
    name: str,
    out: Array,
    backward_fn: Callable,
    ctx: Any,
    inputs: Sequence,
    release: Callable | None = None,
) -> Any:
    """``out`` as a Tensor whose node will run ``backward_fn(grad, ctx, needs)``, if any input
    Tensor requires a gradient and recording is on; else a Tensor that is a leaf.
    ``release(ctx)`` runs when the context is freed (after the node's backward)."""
    needs = tuple(isinstance(t, Tensor) and t.requires_grad for t in inputs)
    if not any(needs) or not is_grad_enabled():
        return Tensor._make(out, None)
    return Tensor._make(out, Node(name, backward_fn, ctx, tuple(inputs), needs, release))


def _topological(root: Node) -> list[Node]:
    """Nodes reachable from ``root``, each after every node that consumes its output
    (iterative DFS: deep networks do not hit Python's recursion limit)."""
    order: list[Node] = []
    seen = {id(root)}
    stack: list[tuple[Node, int]] = [(root, 0)]
    while stack:
        node, i = stack.pop()
        inputs = node.inputs
        while i < len(inputs):
            t = inputs[i]
            i += 1
            child = t._node if isinstance(t, Tensor) else None
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append((node, i))
                stack.append((child, 0))
                break
        else:
            order.append(node)
    order.reverse()
    return order


def _memory(a: Array) -> Any:
    """The object owning the memory behind ``a``: views (reshape, slices) of one array share it."""
    if isinstance(a, np.ndarray):
        return a if a.base is None else a.base
    return getattr(a, "gpu_data", a)


class _Buffers:
    """A set of memories, by identity, that never mistakes a new array for a freed one: an id
    is only unique among live objects, and a gradient freed during the pass (its node done)
    can hand its id to the next array allocated. A stale id in ``handed`` made a needless copy
    of a fresh gradient (4.7 MB a step on mnist_cnn's first Linear); in ``owned`` it would let
    an addition write in place into memory this pass did not make."""

    __slots__ = ("_refs",)

    def __init__(self, *arrays: Array) -> None:
        self._refs: dict[int, Any] = {}
        for a in arrays:
            self.add(a)

    def add(self, a: Array) -> None:
        m = _memory(a)
        try:
            self._refs[id(m)] = weakref.ref(m)
        except TypeError:  # no weak references: keep it alive, so its id stays its own
            self._refs[id(m)] = lambda m=m: m

    def discard(self, a: Array) -> None:
        self._refs.pop(id(_memory(a)), None)

    def __contains__(self, a: Array) -> bool:
        m = _memory(a)
        ref = self._refs.get(id(m))
        return ref is not None and ref() is m


def _add(a: Array, b: Array, owned: _Buffers) -> Array:
    """a + b, in place in ``a`` when this backward pass made ``a``'s memory (never in an array
    a kernel or the user might still read)."""
    if a in owned:
        if isinstance(a, np.ndarray):
            a += b
            return a
        return _device.add(a, b)
    out = a + b if isinstance(a, np.ndarray) else _device.add(_device.copy(a), b)
    owned.add(out)
    return out


def backward(root: Tensor, grad: Any = None, retain_graph: bool = False) -> None:
    """See ``Tensor.backward``."""
    if not isinstance(root, Tensor):
        raise TypeError(f"backward: expected a Tensor; got {type(root).__name__}")
    if not root.requires_grad:
        raise RuntimeError(
            "backward: this Tensor does not require a gradient and has no recorded op "
            "(no input required a gradient, or it was made under no_grad())"
        )
    if grad is None:
        if root.size != 1:
            raise ValueError(
                f"backward: a gradient is needed for a non-scalar Tensor of shape {root.shape} "
                "(pass grad= of that shape, or reduce it to a scalar first)"
            )
        grad = _device.like(root.data, np.ones(root.shape, root.dtype))
    else:
        grad = _as_array(grad, None, "backward")
        if tuple(int(s) for s in grad.shape) != root.shape or np.dtype(grad.dtype) != root.dtype:
            raise ValueError(
                f"backward: grad must match the Tensor: shape {root.shape}, dtype "
                f"{root.dtype}; got shape {tuple(grad.shape)}, dtype {np.dtype(grad.dtype)}"
            )
        if shapes.is_device_array(grad) != shapes.is_device_array(root.data):
            raise ValueError(f"backward: grad is on another device than the Tensor ({root.device})")
    if root._node is None:  # a leaf: its .grad never is the caller's array
        root.grad = _device.copy(grad) if root.grad is None else _add(root.grad, grad, _Buffers())
        return
    owned = _Buffers()  # memory this pass made by adding: safe to add into in place
    handed = _Buffers(grad)  # memory stored as a pending or leaf gradient (or the caller's)
    grads: dict[int, Array] = {id(root._node): grad}
    for node in _topological(root._node):
        g = grads.pop(id(node), None)
        if g is None:  # no gradient reached this node (every path was cut)
            continue
        ctx = node.ctx
        if ctx is _FREED:
            raise RuntimeError(
                f"backward: the graph through {node.name} was already freed by an earlier "
                "backward(); run the forward pass again (or pass retain_graph=True)"
            )
        out = node.backward(g, ctx, node.needs)
        if not retain_graph:
            node.ctx = _FREED
            if node.release is not None:
                node.release(ctx)
        for t, gi, need in zip(node.inputs, out, node.needs):
            if not need or gi is None:
                continue
            child = t._node
            if child is None:  # a leaf: accumulate into .grad
                if t.grad is not None:
                    t.grad = _add(t.grad, gi, owned)
                    continue
                if gi in handed:  # one memory must not become two Tensors' .grad
                    gi = _device.copy(gi)
                t.grad = gi
            else:
                k = id(child)
                if k in grads:
                    gi = _add(grads[k], gi, owned)
                grads[k] = gi
            if gi in handed:  # stored twice now: never added into in place
                owned.discard(gi)
            handed.add(gi)


# --------------------------------------------------------------------------- gradcheck


class GradcheckError(AssertionError):
    pass


def gradcheck(
    fn: Callable[..., Tensor],
    inputs: Sequence[Any],
    *,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    seed: int = 0,
    raise_exception: bool = True,
) -> bool:
    """Check the tape's gradients of ``fn(*inputs)`` against float64 central differences
    (like ``torch.autograd.gradcheck``).

    Every input Tensor with ``requires_grad`` must be float64. The output is projected on a
    fixed random direction v (s = sum(fn(*inputs) * v)); the analytic gradient of s from one
    ``backward(v)`` is compared, element by element, with (s(x + eps) - s(x - eps)) / (2 eps)
    for every element of every such input. Returns True, or raises ``GradcheckError`` naming
    the input, the index and both values (returns False when ``raise_exception`` is False).
    """
    inputs = list(inputs)
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input Tensor requires a gradient")
    for i in checked:
        if inputs[i].dtype != np.float64 or inputs[i].device != "cpu":
            raise ValueError(
                f"gradcheck: input {i} must be a float64 host Tensor; got "
                f"{inputs[i].dtype} on {inputs[i].device}"
            )
    for i in checked:
        inputs[i].grad = None
    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor; got {type(out).__name__}")
    v = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
    out.backward(v)
    analytic = [
        np.zeros(inputs[i].shape) if inputs[i].grad is None else np.array(inputs[i].grad)
        for i in checked
    ]

    def s() -> float:
        with no_grad():
            return float(np.sum(np.asarray(fn(*inputs).numpy(), np.float64) * v))

    for a, i in zip(analytic, checked):
        x = inputs[i].data
        flat = x.reshape(-1)
        for j in range(flat.size):
            old = flat[j]
            flat[j] = old + eps
            fp = s()
            flat[j] = old - eps
            fm = s()
            flat[j] = old
            num = (fp - fm) / (2 * eps)
            got = a.reshape(-1)[j]
            if not abs(got - num) <= atol + rtol * abs(num):
                if not raise_exception:
                    return False
                raise GradcheckError(
                    f"gradcheck: input {i}, element {np.unravel_index(j, x.shape)}: "
                    f"analytic {got!r} vs numerical {num!r} (atol={atol}, rtol={rtol})"
                )
    return True


__all__ = ["GradcheckError", "Tensor", "backward", "enable_grad", "gradcheck", "no_grad"]
