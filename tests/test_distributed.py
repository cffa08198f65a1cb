"""Data-parallel training and ensembles over MPI: ``mpiexec -n 2`` (one Numba thread per rank)
against one process, rank-0-only writes, resume, BatchNorm's per-rank statistics, errors.

The ranks run this file as a script (``python -m tests.test_distributed SCENARIO OUT``, see
``worker``) on a tiny synthetic task; the tests compare what the ranks wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
# one thread per rank on 2 cores; the heuristic algorithm choice (no timing-dependent autotune),
# so separate processes run the same kernels and bit-equality is well defined
ENV = {
    **os.environ,
    "NUMBA_NUM_THREADS": "1",
    "FASTCONV_AUTOTUNE": "0",
    "PYTHONPATH": str(REPO),
}


def _have_mpi4py() -> bool:
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


needs_mpi = pytest.mark.skipif(
    not (_have_mpi4py() and MPIEXEC),
    reason="no MPI: mpi4py or mpiexec missing (pip install 'fastconv[mpi]' installs both)",
)

# 81 images at a global batch of 20: the last batch holds 1 image, so rank 1 has none
N_TRAIN, BATCH, EPOCHS, LR = 81, 20, 2, 0.05


# --------------------------------------------------------------------------- the ranks' side


def _data():
    from tests.test_training import synthetic

    return synthetic(N_TRAIN, seed=0), synthetic(30, seed=1)


def _fit(out: Path, tag: str, distributed: bool, epochs: int = EPOCHS, **kw):
    import fastconv as fc
    from fastconv import distributed as dist

    (x, y), test = _data()
    model = fc.models.lenet5(rng=0)
    opt = fc.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    dp = dist.DataParallel(model, opt) if distributed else None
    hist = fc.training.fit(
        model,
        opt,
        (x, y),
        test,
        epochs=epochs,
        batch_size=BATCH,
        rng=0,
        augment="shift",
        progress=False,
        distributed=dp,
        **kw,
    )
    rank = dp.rank if dp else 0
    np.savez(out / f"{tag}.rank{rank}.npz", **model.state_dict())
    if rank == 0:
        (out / f"{tag}.json").write_text(json.dumps(hist))
    return model


def _bn_model(fc):
    return fc.Sequential(
        fc.Conv2d(1, 4, 3, stride=2, rng=0),
        fc.BatchNorm2d(4),
        fc.ReLU(),
        fc.AdaptiveAvgPool2d(1),
        fc.Flatten(),
        fc.Linear(4, 4, rng=1),
    )


def _bn_step(out: Path) -> None:
    """One SGD step of a BatchNorm model on 11 images over the ranks, through the Python API."""
    import fastconv as fc
    from fastconv import distributed as dist
    from fastconv.training import normalize

    (x, y), _ = _data()
    x, y = normalize(x[:11]), y[:11]
    model = _bn_model(fc)
    opt = fc.optim.SGD(model.parameters(), lr=0.1)
    dp = dist.DataParallel(model, opt)
    part = dp.shard(len(y))
    loss = fc.CrossEntropyLoss()(model(x[part]), y[part])
    opt.zero_grad()
    loss.backward()
    dp.step(len(y[part]), len(y))
    dp.sync_buffers()
    np.savez(out / f"bn.rank{dp.rank}.npz", **model.state_dict())


def worker(scenario: str, out: Path) -> None:
    from fastconv import distributed as dist

    comm = dist.world()
    print(dist.describe_world(comm), flush=True)
    with dist.abort_on_error(comm):
        if scenario == "fit":  # 2 epochs; 1 epoch + resume; rank 0 also trains alone
            _fit(out, "dp", True)
            _fit(out, "half", True, epochs=1, checkpoint=out / "ckpt.npz")
            _fit(out, "resumed", True, checkpoint=out / "ckpt.npz", resume=True)
            if comm.Get_rank() == 0:
                _fit(out, "one", False)
        elif scenario == "bn":
            _bn_step(out)
        elif scenario == "fail":  # rank 1 fails in epoch 2; rank 0 has written a checkpoint
            calls = [0]
            from fastconv.losses import CrossEntropyLoss

            def loss_fn(logits, labels):
                calls[0] += 1
                if comm.Get_rank() == 1 and calls[0] == 7:
                    raise RuntimeError("injected failure on rank 1")
                return CrossEntropyLoss()(logits, labels)

            model = _fit(out, "fail", True, epochs=3, checkpoint=out / "ckpt.npz", loss_fn=loss_fn)
            if comm.Get_rank() == 0:
                np.savez(out / "final.npz", **model.state_dict())


def _mpirun(n: int | None, scenario: str, out: Path, timeout: int = 240):
    cmd = [sys.executable, "-m", "tests.test_distributed", scenario, str(out)]
    if n is not None:
        cmd = [MPIEXEC, "-n", str(n), *cmd]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _assert_close(a: dict, b: dict, exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------- tests


@needs_mpi
def test_two_ranks_equal_one_process_and_resume(tmp_path):
    """Global batch 20 over 2 ranks (last batch: 1 image, rank 1 empty), momentum SGD, random
    shifts: the same parameters as one process at batch 20 within float32 rounding; identical
    on both ranks; the reduced history equals one process's; resume is exact; rank 0 alone
    writes the checkpoint."""
    r = _mpirun(2, "fit", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "distributed: 2 ranks over MPI" in r.stdout
    dp0, dp1 = _load(tmp_path / "dp.rank0.npz"), _load(tmp_path / "dp.rank1.npz")
    _assert_close(dp0, dp1, exact=True)  # every rank holds the same model
    one = _load(tmp_path / "one.rank0.npz")
    _assert_close(dp0, one)
    h_dp = json.loads((tmp_path / "dp.json").read_text())
    h_one = json.loads((tmp_path / "one.json").read_text())
    np.testing.assert_allclose(h_dp["train_loss"], h_one["train_loss"], rtol=1e-5)
    assert h_dp["train_accuracy"] == h_one["train_accuracy"]
    assert h_dp["test_accuracy"] == h_one["test_accuracy"]
    np.testing.assert_allclose(h_dp["test_loss"], h_one["test_loss"], rtol=1e-5)
    _assert_close(_load(tmp_path / "resumed.rank0.npz"), dp0, exact=True)
    _assert_close(_load(tmp_path / "resumed.rank1.npz"), dp0, exact=True)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert "ckpt.npz" in written and not [p for p in written if p.endswith(".tmp")]


@needs_mpi
def test_a_one_process_world_says_so_and_is_bit_equal(tmp_path):
    r = _mpirun(None, "fit", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not started by mpiexec: a one-process world" in r.stdout
    _assert_close(_load(tmp_path / "dp.rank0.npz"), _load(tmp_path / "one.rank0.npz"), True)


@needs_mpi
def test_batchnorm_statistics_are_per_rank(tmp_path):
    """Per-rank BatchNorm (PyTorch DDP's default): one step over 2 ranks (6 + 5 images) equals
    one process stepping with (6/11) g(first 6) + (5/11) g(last 5), each slice normalised on its
    own; the running statistics are the mean of the two slices' updates."""
    import fastconv as fc
    from fastconv.training import normalize

    r = _mpirun(2, "bn", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    got0, got1 = _load(tmp_path / "bn.rank0.npz"), _load(tmp_path / "bn.rank1.npz")
    _assert_close(got0, got1, exact=True)

    (x, y), _ = _data()
    x, y = normalize(x[:11]), y[:11]
    base = _bn_model(fc)
    grads, stats = [], []
    for sl in (slice(0, 6), slice(6, 11)):
        m = _bn_model(fc)
        fc.CrossEntropyLoss()(m(x[sl]), y[sl]).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
        stats.append({n: b for n, b in m.named_buffers()})
    want = base.state_dict()
    for n, p in base.named_parameters():
        g = (6 / 11) * grads[0][n].astype(np.float64) + (5 / 11) * grads[1][n]
        want[n] = p.data - 0.1 * g
    for n in ("1.running_mean", "1.running_var"):
        want[n] = (stats[0][n].astype(np.float64) + stats[1][n]) / 2
    want["1.num_batches_tracked"] = np.array(1)
    for k in want:
        np.testing.assert_allclose(got0[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # and it is NOT one process at batch 11 (whose BatchNorm sees all 11 images at once)
    full = _bn_model(fc)
    fc.CrossEntropyLoss()(full(x), y).backward()
    w = full.named_parameters().__next__()[1]
    assert not np.allclose(got0["0.weight"], w.data - 0.1 * w.grad, rtol=1e-6, atol=1e-8)


@needs_mpi
def test_a_failing_rank_stops_every_rank_and_leaves_no_half_written_file(tmp_path):
    r = _mpirun(2, "fail", tmp_path, timeout=120)
    assert r.returncode != 0
    assert "rank 1 of 2 failed (RuntimeError: injected failure on rank 1)" in r.stderr
    assert not (tmp_path / "final.npz").exists() and not (tmp_path / "fail.rank0.npz").exists()
    names = [p.name for p in tmp_path.iterdir()]
    assert not [n for n in names if n.endswith(".tmp")], names
    if (tmp_path / "ckpt.npz").exists():  # epoch 1's checkpoint, complete
        import fastconv as fc

        model = fc.models.lenet5(rng=0)
        opt = fc.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        meta = fc.training.load_checkpoint(
            tmp_path / "ckpt.npz", model, opt, np.random.default_rng()
        )
        assert meta["epoch"] == 1


def test_distributed_without_mpi4py_names_the_extra(monkeypatch, tmp_path):
    from fastconv import cli, distributed

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    with pytest.raises(distributed.DistributedError, match=r"fastconv\[mpi\]"):
        distributed.world()
    with pytest.raises(SystemExit, match=r"--distributed: .*pip install 'fastconv\[mpi\]'"):
        cli.main(["train", "--distributed", "--data-dir", str(tmp_path), "--no-progress"])


def test_load_state_dict_keeps_0d_buffers():
    """Broadcasting and resuming load state dicts: BatchNorm's 0-d counter must stay 0-d."""
    import fastconv as fc

    m = fc.BatchNorm2d(3)
    m.load_state_dict(m.state_dict())
    assert m.num_batches_tracked.shape == ()
    m(np.ones((2, 3, 2, 2), np.float32))  # counts on
    assert int(m.num_batches_tracked) == 1


def test_shards_and_member_plans():
    from fastconv.distributed import DistributedError, member_plan, shard_bounds

    assert [shard_bounds(11, 2, r) for r in (0, 1)] == [(0, 6), (6, 11)]
    assert [shard_bounds(1, 2, r) for r in (0, 1)] == [(0, 1), (1, 1)]
    assert [shard_bounds(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [member_plan(2, 4, r) for r in range(4)] == [(0, [0]), (0, [0]), (1, [1]), (1, [1])]
    assert member_plan(3, 1, 0) == (0, [0, 1, 2])
    assert member_plan(5, 2, 1) == (1, [1, 3])
    with pytest.raises(DistributedError, match="3 ranks cannot form 2 equal groups"):
        member_plan(2, 3, 0)


def test_ensemble_evaluation_averages_softmax():
    import fastconv as fc
    from fastconv.distributed import evaluate_ensemble, softmax_average

    z = [np.array([[2.0, 0.0]]), np.array([[0.0, 1.0]])]
    p = softmax_average(z)
    e = [np.exp(v) / np.exp(v).sum() for v in z]
    np.testing.assert_allclose(p, (e[0] + e[1]) / 2)
    (x, y), _ = _data()
    m = fc.models.lenet5(rng=0)
    loss, acc = evaluate_ensemble([m, m], x[:20], y[:20])
    l1, a1 = fc.training.evaluate(m, x[:20], y[:20])
    assert acc == a1 and loss == pytest.approx(l1, rel=1e-5)


@needs_mpi
@pytest.mark.slow
def test_cli_distributed_ensemble_matches_sequential_members(tmp_path):
    """``mpiexec -n 2 fastconv train --ensemble 2 --distributed``: one member per rank, bit-equal
    to the same members trained in turn by one process; rank 0 alone writes weights and
    metrics, and evaluates the averaged softmax."""
    from tests.test_training import mnist_dir

    data = mnist_dir()
    if data is None:
        pytest.skip("real MNIST not found (set FASTCONV_DATA or place it in ../shared/data/mnist)")
    args = [
        "train", "--data-dir", str(data), "--train-limit", "120", "--batch-size", "20",
        "--epochs", "1", "--no-progress", "--seed", "5", "--ensemble", "2",
    ]  # fmt: skip
    par, seq = tmp_path / "par", tmp_path / "seq"
    par.mkdir(), seq.mkdir()
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "fastconv", *args, "--distributed"]
    cmd += ["--save", str(par / "w.npz"), "--metrics-json", str(par / "m.json")]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("fastconv train:") == 1 and "ensemble of 2: test accuracy" in r.stdout
    assert sorted(p.name for p in par.iterdir()) == ["m.json", "w.member0.npz", "w.member1.npz"]
    cmd = [sys.executable, "-m", "fastconv", *args]
    cmd += ["--save", str(seq / "w.npz"), "--metrics-json", str(seq / "m.json")]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    for k in (0, 1):
        _assert_close(_load(par / f"w.member{k}.npz"), _load(seq / f"w.member{k}.npz"), True)
    mp, ms = (json.loads((d / "m.json").read_text()) for d in (par, seq))
    assert mp["ensemble_test_accuracy"] == ms["ensemble_test_accuracy"]
    assert mp["ranks"] == 2 and ms["ranks"] == 1 and len(mp["members"]) == 2


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
