"""Data-parallel training and ensembles over MPI (mpi4py): MPI is the transport, nothing else.

    mpiexec -n 4 fastconv train --distributed --batch-size 256 ...     # one global batch of 256

    import fastconv.distributed as dist
    dp = dist.DataParallel(model, opt)        # rank 0's parameters and buffers on every rank
    fc.training.fit(model, opt, train, test, batch_size=256, rng=0, distributed=dp)

    # or a loop of one's own: every rank sees the same global batch and takes its slice
    part = dp.shard(len(yb)); loss = loss_fn(model(xb[part]), yb[part])
    opt.zero_grad(); loss.backward(); dp.step(len(yb[part]), len(yb))  # Allreduce, then opt.step

Semantics (what makes N ranks at global batch B equal one process at batch B):

- Every rank draws the same shuffled order (and augmentation) from the same seed and takes a
  contiguous slice of each global batch (``shard_bounds``: the first ``B % N`` ranks get one
  more image; a short last batch may leave a rank with none, which then contributes zeros).
- The loss is a mean over the LOCAL batch, so rank r's gradient is (1/n_r) sum_i grad l_i. Each
  rank scales it by n_r / B (B = this step's global batch, the short last one included) into ONE
  contiguous buffer; one in-place ``Allreduce(SUM)`` of that buffer then holds
  sum_r (n_r / B) g_r = (1/B) sum_i grad l_i, the one-process gradient. The buffer ends with one
  flag per parameter (1 where a rank had a gradient), so a parameter no rank touched keeps
  ``grad = None`` as it would in one process. No per-parameter messages.
- Equality: within float32 rounding (the partial sums are added in another order, and the
  n_r / B scaling rounds once); BIT-equal for a one-process world, where the factor is exactly
  1.0 and the reduction is the identity (tested), and for ensemble members on one rank each.
- BatchNorm: per-rank batch statistics during training, like PyTorch DDP's default (each rank
  normalises its own slice, so a BN model at N ranks equals one process that normalises each
  slice on its own -- "ghost batch" BN -- not one process at batch B). Running statistics are
  averaged over the ranks (one Allreduce) at the end of every epoch, before evaluation and
  checkpoints, so every rank holds the same model. Integer buffers (``num_batches_tracked``)
  are taken from rank 0.
- Dropout: each rank's layer generators jump ahead ``rank`` times (2^127 draws each), so the
  ranks draw independent masks (a dropout model is therefore not equal to one process).
- Rank 0 alone logs, shows progress and writes files (atomically, as ``training`` does);
  ``abort_on_error`` turns an exception on any rank into ``MPI_Abort``: every rank stops, the
  exit status is non-zero, and no file is left half-written (writes are temp file + rename).

GPU ranks would plug in at ``DataParallel._pack`` / ``_unpack``: with a CUDA-aware MPI the
flat buffer is a device array passed to the same ``Allreduce`` (mpi4py accepts
``__cuda_array_interface__``); with NCCL, ``ncclAllReduce`` on that buffer replaces it.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .features import softmax_average  # the one averaging, shared with fc.Ensemble
from .nn import Module

EXTRA = "fastconv[mpi]"
INSTALL_HINT = f"pip install '{EXTRA}' (mpi4py and an MPI library, e.g. the mpich wheel)"

# Variables a launcher (mpiexec of MPICH / Open MPI / Intel MPI, srun) sets in every rank.
_LAUNCHER_VARS = (
    "PMI_RANK",
    "PMI_SIZE",
    "PMIX_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "SLURM_PROCID",
)


class DistributedError(RuntimeError):
    """A distributed run cannot start (no mpi4py, a bad rank layout)."""


def _mpi() -> Any:
    """mpi4py's MPI module, imported only when a communicator is first needed."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DistributedError(f"distributed training needs mpi4py: {INSTALL_HINT} ({e})") from e
    return MPI


def world() -> Any:
    """MPI.COMM_WORLD (MPI is initialised on first use)."""
    return _mpi().COMM_WORLD


def launched_by_mpiexec() -> bool:
    """True when a launcher started this process (its variables are set)."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def describe_world(comm: Any) -> str:
    """One line about the world: its size, or that it is a one-process world and why."""
    if comm.Get_size() == 1 and not launched_by_mpiexec():
        return (
            "distributed: not started by mpiexec: a one-process world (rank 0 of 1); "
            "run under mpiexec -n N for N ranks"
        )
    return f"distributed: {comm.Get_size()} ranks over MPI ({_mpi().Get_library_version()[:40]})"


def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank ``rank``'s contiguous slice of ``n`` items over ``size`` ranks: the first
    ``n % size`` ranks get one more (``np.array_split``'s rule)."""
    q, r = divmod(int(n), int(size))
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


@contextmanager
def abort_on_error(comm: Any = None) -> Iterator[None]:
    """An exception on any rank stops every rank: it is printed with its rank and the world is
    aborted (``MPI_Abort``, non-zero exit), instead of the other ranks waiting forever in their
    next collective. In a one-process world the exception propagates as usual."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        comm = comm if comm is not None else world()
        if comm.Get_size() > 1:
            sys.stdout.flush()
            sys.stderr.write(
                traceback.format_exc()
                + f"fastconv: rank {comm.Get_rank()} of {comm.Get_size()} failed "
                f"({type(e).__name__}: {e}); aborting every rank\n"
            )
            sys.stderr.flush()
            time.sleep(0.5)  # lets the launcher forward the message before it kills the ranks
            comm.Abort(1)
        raise


# --------------------------------------------------------------------------- data parallel


class DataParallel:
    """Wraps a model (and optionally its optimizer) for data-parallel training over ``comm``.

    On construction rank 0's parameters and buffers are broadcast (one ``Bcast`` of a flat
    buffer) and each rank's Dropout generators jump to their own stream. ``sync_gradients``
    sums the gradients with one in-place ``Allreduce`` per step; ``fit(..., distributed=dp)``
    calls it, shards every global batch and evaluation, and lets rank 0 alone log and write.
    """

    def __init__(self, model: Module, optimizer: Any = None, comm: Any = None) -> None:
        self.MPI = _mpi()
        self.comm = comm if comm is not None else self.MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.model, self.optimizer = model, optimizer
        if model.device != "cpu":
            # CUDA-aware MPI (a device buffer to the same Allreduce) or NCCL would plug in here.
            raise NotImplementedError(
                "DataParallel: host (CPU) models only for now; got a model on "
                f"{model.device!r} (CUDA-aware MPI or NCCL would reduce device buffers)"
            )
        # every rank updates its replica with the same kernels, never one on the oracle
        # while another has switched to the compiled kernels (warm start: fastconv/_warm.py)
        from . import _warm

        _warm.disable()
        self.params = [p for p in model.parameters() if p.requires_grad]
        dtypes = {np.dtype(p.dtype) for p in self.params}
        if len(dtypes) > 1:
            raise TypeError(f"DataParallel: parameters of one dtype only; got {sorted(dtypes)}")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
        sizes = [int(np.prod(p.shape)) for p in self.params]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.numel = int(self._offsets[-1])
        # gradients, then one "had a gradient" flag per parameter: ONE message per step
        self._buf = np.zeros(self.numel + len(self.params), self.dtype)
        self.broadcast_state()
        self._jump_generators()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def nbytes(self) -> int:
        """Bytes each rank contributes to one step's Allreduce."""
        return int(self._buf.nbytes)

    def shard(self, n: int) -> slice:
        """This rank's slice of a global batch of ``n``."""
        return slice(*shard_bounds(n, self.size, self.rank))

    # ---- parameters and buffers
    def broadcast_state(self, root: int = 0) -> None:
        """Rank ``root``'s parameters and buffers on every rank: one Bcast of the floating-point
        entries in one flat buffer, the integer ones (counters) as a small object."""
        if self.size == 1:
            return
        state = self.model.state_dict()
        floats = [k for k, v in state.items() if v.dtype.kind == "f"]
        flat = np.concatenate([state[k].ravel().astype(np.float64) for k in floats] or [[]])
        self.comm.Bcast(flat, root=root)
        ints = self.comm.bcast({k: v for k, v in state.items() if v.dtype.kind != "f"}, root)
        new, off = dict(ints), 0
        for k in floats:
            v = state[k]
            new[k] = flat[off : off + v.size].reshape(v.shape).astype(v.dtype)
            off += v.size
        self.model.load_state_dict(new)

    def sync_buffers(self) -> None:
        """Average the floating-point buffers (BatchNorm running statistics) over the ranks
        (one Allreduce); integer buffers become rank 0's."""
        if self.size == 1:
            return
        state = {k: v for k, v in self.model.state_dict().items() if k in self._buffer_keys()}
        floats = [k for k, v in state.items() if v.dtype.kind == "f"]
        if floats:
            flat = np.concatenate([state[k].ravel().astype(np.float64) for k in floats])
            self.comm.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)
            flat /= self.size
            off = 0
            for k in floats:
                v = state[k]
                state[k] = flat[off : off + v.size].reshape(v.shape).astype(v.dtype)
                off += v.size
        ints = self.comm.bcast({k: v for k, v in state.items() if v.dtype.kind != "f"}, 0)
        state.update(ints)
        if state:
            self.model.load_state_dict(state, strict=False)

    def _buffer_keys(self) -> set[str]:
        return {k for k, _ in self.model.named_buffers()}

    def _jump_generators(self) -> None:
        if self.rank == 0:
            return
        for _, g in self.model.named_generators():
            bg = g.bit_generator
            if hasattr(bg, "jumped"):
                bg.state = bg.jumped(self.rank).state

    # ---- gradients
    def _pack(self, weight: float) -> None:
        buf, off = self._buf, self._offsets
        flags = buf[self.numel :]
        w = self.dtype.type(weight)
        for i, p in enumerate(self.params):
            seg = buf[off[i] : off[i + 1]]
            if p.grad is None:
                seg.fill(0)
                flags[i] = 0
            else:
                np.multiply(np.asarray(p.grad).reshape(-1), w, out=seg)
                flags[i] = 1

    def _unpack(self) -> None:
        buf, off = self._buf, self._offsets
        flags = buf[self.numel :]
        for i, p in enumerate(self.params):
            # a view into the reduced buffer: no copy (the next step rewrites the buffer only
            # after backward has made new gradients)
            p.grad = buf[off[i] : off[i + 1]].reshape(p.shape) if flags[i] > 0 else None

    def sync_gradients(self, n_local: int, n_global: int) -> None:
        """grad <- (1/B) sum_i grad l_i over the global batch of B = ``n_global``, from each
        rank's mean-loss gradient over its ``n_local`` images: one in-place Allreduce."""
        if n_global <= 0:
            raise ValueError(f"DataParallel.sync_gradients: n_global must be > 0; got {n_global}")
        self._pack(n_local / n_global)  # exactly 1.0 in a one-process world
        if self.size > 1:
            self.comm.Allreduce(self.MPI.IN_PLACE, self._buf, op=self.MPI.SUM)
        self._unpack()

    def step(self, n_local: int, n_global: int) -> None:
        """``sync_gradients`` then the wrapped optimizer's ``step``."""
        if self.optimizer is None:
            raise ValueError("DataParallel.step: no optimizer was given to DataParallel")
        self.sync_gradients(n_local, n_global)
        self.optimizer.step()

    # ---- the training loop's hooks (fastconv.training.fit)
    def start(self, rng: np.random.Generator, resumed: bool = False) -> None:
        """Before the first epoch: rank 0's shuffling generator everywhere (a seedless run would
        shuffle differently per rank); after a resume, rank 0's state and generators again."""
        rng.bit_generator.state = self.comm.bcast(rng.bit_generator.state, 0)
        if resumed:
            self.broadcast_state()
            self._jump_generators()

    def reduce_sums(self, *values: float) -> list[float]:
        """Element-wise sums over the ranks of a few numbers (one small Allreduce)."""
        a = np.array(values, np.float64)
        if self.size > 1:
            self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        return [float(v) for v in a]

    def end_epoch(self, seen: int, loss_sum: float, correct: int) -> tuple[int, float, int]:
        """The epoch's global sums; BatchNorm running statistics averaged over the ranks."""
        self.sync_buffers()
        s, ls, c = self.reduce_sums(seen, loss_sum, correct)
        return int(round(s)), ls, int(round(c))

    def evaluate(self, model: Module, x: np.ndarray, y: np.ndarray, **kw: Any):
        """``training.evaluate`` on this rank's slice of (x, y), reduced over the ranks."""
        from .training import evaluate

        lo, hi = shard_bounds(len(x), self.size, self.rank)
        loss, acc = evaluate(model, x[lo:hi], y[lo:hi], **kw) if hi > lo else (0.0, 0.0)
        ls, c, n = self.reduce_sums(loss * (hi - lo), acc * (hi - lo), hi - lo)
        return ls / n, c / n


# --------------------------------------------------------------------------- ensembles


def member_plan(k: int, size: int, rank: int) -> tuple[int, list[int]]:
    """(group, members) of ``rank`` when ``size`` ranks train ``k`` members: with size >= k,
    k groups of size // k consecutive ranks (size must be a multiple of k), one member each;
    with size < k, every rank is its own group and trains members rank, rank + size, ..."""
    if k < 1:
        raise DistributedError(f"ensemble: K must be >= 1; got {k}")
    if size >= k:
        if size % k:
            raise DistributedError(
                f"ensemble: {size} ranks cannot form {k} equal groups; run a multiple of "
                f"{k} ranks (mpiexec -n {k}, -n {2 * k}, ...) or fewer ranks than members"
            )
        group = rank // (size // k)
        return group, [group]
    return rank, list(range(rank, k, size))


def evaluate_ensemble(
    models: Sequence[Module],
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 1000,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> tuple[float, float]:
    """(NLL of the averaged softmax, accuracy) of an ensemble on uint8 images: the members'
    probabilities are averaged (not their logits) by ``fc.Ensemble``, scored by
    ``training.evaluate``. Each member's mode is restored afterwards.

    Shape: x (N, C, H, W) uint8 (or float, used as is), y (N,) ints.
    """
    from . import training
    from .features import Ensemble

    mean = training.STATS["digits"][0] if mean is None else mean
    std = training.STATS["digits"][1] if std is None else std
    modes = [m.training for m in models]
    try:
        return training.evaluate(Ensemble(models), x, y, batch_size=batch_size, mean=mean, std=std)
    finally:
        for m, t in zip(models, modes):
            m.train(t)


# --------------------------------------------------------------------------- the command


def member_path(path: str | os.PathLike, member: int) -> str:
    """``run.npz`` -> ``run.member3.npz``: where member 3 of an ensemble is written."""
    from pathlib import Path

    p = Path(path)
    return str(p.with_name(f"{p.stem}.member{member}{p.suffix}"))


def train_command(args: Any) -> int:
    """``fastconv train --distributed`` and/or ``--ensemble K`` (called by ``cli.cmd_train``).

    Data-parallel over the world, or K members over K rank groups (sub-communicators of
    size // K ranks; with fewer ranks than members each rank trains members rank, rank + size,
    ...; without --distributed one process trains them in turn). Member k starts from seed
    ``seed + k`` (weights and shuffling). World rank 0 prints, evaluates the ensemble (the
    averaged softmax, ``evaluate_ensemble``) and writes the weights and the metrics; each
    member's checkpoint is written by its group's first rank (``member_path``).
    """
    if args.resume and not args.checkpoint:
        raise SystemExit("fastconv: --resume needs --checkpoint FILE")
    if args.ensemble < 1:
        raise SystemExit(f"fastconv: --ensemble must be >= 1; got {args.ensemble}")
    comm = None
    if args.distributed:
        if args.backend == "cuda":
            raise SystemExit(
                "fastconv: --distributed runs host (CPU) models; GPU ranks (CUDA-aware MPI or "
                "NCCL) are not supported yet"
            )
        try:
            comm = world()
        except DistributedError as e:
            raise SystemExit(f"fastconv: --distributed: {e}") from None
    ctx = abort_on_error(comm) if comm is not None else _nullcontext()
    with ctx:
        return _train(args, comm)


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def _train(args: Any, comm: Any) -> int:
    from . import cli, training

    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    root = rank == 0
    say = (lambda s: print(s, flush=True)) if root else (lambda s: None)
    args.model = args.model or "lenet5"
    args.dataset = args.dataset or "mnist"
    if args.plot_dir:
        raise SystemExit("fastconv: --plot-dir is not available with --distributed / --ensemble")
    cli._check_backend(args)
    if args.threads is None and size > 1:  # the ranks share one host's cores (as in CI)
        import numba

        args.threads = max(1, numba.config.NUMBA_NUM_THREADS // size)
    cli._set_threads(args.threads)
    K = args.ensemble
    if comm is not None:
        say(describe_world(comm))
        group, members = member_plan(K, size, rank) if K > 1 else (0, [0])
        sub = comm.Split(group, rank) if K > 1 else comm
    else:
        group, members, sub = 0, list(range(K)), None
    x_train, y_train, x_test, y_test = cli._load_data(args)
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    mean, std = cli._stats(args, x_train)
    shape = cli._shape_meta(args, x_train)  # input channels, classes, size
    lr = args.lr if args.lr is not None else cli.DEFAULT_LR[args.optimizer]
    say(
        f"fastconv train: {args.model} on {args.dataset} ({len(x_train)} images), "
        f"{args.optimizer} lr={lr}, global batch {args.batch_size}, {args.epochs} epochs, "
        f"augment={args.augment}, seed {args.seed}, {size} rank(s)"
        + (f", ensemble of {K}" if K > 1 else "")
    )
    steps = -(-len(x_train) * (5 if args.augment == "expand" else 1) // args.batch_size)
    mine, nbytes, t0 = [], 0, time.perf_counter()
    for k in members:
        model = cli._model_for(args, shape, args.seed + k, log=say)
        opt = _optimizer(args, model, lr)
        dp = DataParallel(model, opt, sub) if sub is not None else None
        nbytes = dp.nbytes if dp is not None else 0
        group_root = dp is None or dp.is_root
        ckpt = args.checkpoint
        if ckpt and K > 1:
            ckpt = member_path(ckpt, k)
        tag = f"member {k} (seed {args.seed + k}): " if K > 1 else ""
        with cli._backend_context(args):
            hist = training.fit(
                model,
                opt,
                (x_train, y_train),
                (x_test, y_test),
                epochs=args.epochs,
                batch_size=args.batch_size,
                rng=args.seed + k,
                augment=None if args.augment == "none" else args.augment,
                mean=mean,
                std=std,
                lr_decay=args.lr_decay,
                checkpoint=ckpt,
                resume=args.resume,
                progress=not args.no_progress and root,
                log=(lambda s, tag=tag: print(tag + s, flush=True)) if root else None,
                distributed=dp,
            )
        if group_root:
            mine.append((k, model.state_dict(), hist))
    total = time.perf_counter() - t0
    trained = comm.gather(mine, root=0) if comm is not None else [mine]
    if not root:
        return 0
    done = sorted((m for part in trained for m in part), key=lambda m: m[0])
    meta = {"model": args.model, "dataset": args.dataset, "mean": mean, "std": std}
    meta.update(shape)
    nets = []
    for k, state, _ in done:
        net = cli._model_for(args, shape, 0, pretrained=False)
        net.load_state_dict(state)
        nets.append(net)
        if args.save:
            path = member_path(args.save, k) if K > 1 else args.save
            training.save_model(path, net, {**meta, "member": k, "seed": args.seed + k})
            print(f"saved weights to {path}")
    hist = done[0][2]
    secs = [round(s, 3) for s in hist["seconds"]]
    metrics = {
        "command": "train",
        **meta,
        "test_accuracy": hist["test_accuracy"][-1],
        "test_loss": hist["test_loss"][-1],
        "best_test_accuracy": max(hist["test_accuracy"]),
        "epochs": len(hist["seconds"]),
        "seconds_per_epoch": secs,
        "images_per_second": float(np.mean(hist["images_per_second"])),
        "steps_per_second": float(np.mean([steps / s for s in hist["seconds"]])),
        "total_seconds": round(total, 3),
        "history": hist,
        "ranks": size,
        "distributed": comm is not None,
        "allreduce_bytes_per_step": nbytes,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "environment": cli._environment(),
    }
    if K > 1:
        el, ea = evaluate_ensemble(nets, x_test, y_test, mean=mean, std=std)
        metrics.update(
            ensemble=K,
            ensemble_test_accuracy=ea,
            ensemble_test_loss=el,
            members=[
                {
                    "member": k,
                    "seed": args.seed + k,
                    "test_accuracy": h["test_accuracy"][-1],
                    "test_loss": h["test_loss"][-1],
                    "history": h,
                }
                for k, _, h in done
            ],
        )
        print(f"ensemble of {K}: test accuracy {ea:.4f}, loss {el:.4f} (averaged softmax)")
    cli._write_json(args.metrics_json, metrics)
    print(
        f"test accuracy {metrics['test_accuracy']:.4f} after {metrics['epochs']} epochs "
        f"({np.mean(secs):.1f} s/epoch, {metrics['steps_per_second']:.1f} steps/s, "
        f"{size} rank(s))",
        flush=True,
    )
    return 0


def _optimizer(args: Any, model: Module, lr: float) -> Any:
    from . import optim

    kw: dict = {"weight_decay": args.weight_decay}
    if args.optimizer in ("sgd", "rmsprop"):
        kw["momentum"] = args.momentum
    return optim.OPTIMIZERS[args.optimizer](model.parameters(), lr=lr, **kw)


__all__ = [
    "EXTRA",
    "DataParallel",
    "DistributedError",
    "abort_on_error",
    "describe_world",
    "evaluate_ensemble",
    "launched_by_mpiexec",
    "member_path",
    "member_plan",
    "shard_bounds",
    "softmax_average",
    "train_command",
    "world",
]
