"""benchmarks/zoo_table.py's pure parts: overrides, the train arguments, the recipe it resolves
(the same as ``fastconv train``'s defaults), the report; the torch twins it writes load the
zoo's state dicts (skipped without torch). No training."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks import zoo_table as zt
from fastconv import cli, models


def test_parse_overrides():
    assert zt.parse_overrides(["nielsen=3", "resnet8=1"]) == {"nielsen": 3, "resnet8": 1}
    assert zt.parse_overrides([]) == {}
    for bad in (["nielsen"], ["nope=2"], ["nielsen=x"], ["nielsen=0"]):
        with pytest.raises(ValueError):
            zt.parse_overrides(bad)


def test_train_argv_gives_epochs_only_when_overridden():
    argv = zt.train_argv("lenet5", seed=0)
    assert argv[:3] == ["train", "--model", "lenet5"] and "--epochs" not in argv
    argv = zt.train_argv("vgg_mini", seed=1, epochs=2, data_dir="/d", train_limit=500)
    assert argv[argv.index("--epochs") + 1] == "2"
    assert argv[argv.index("--train-limit") + 1] == "500"
    assert argv[argv.index("--data-dir") + 1] == "/d"


@pytest.mark.parametrize("name", zt.MODELS)
def test_resolved_recipe_is_the_models_default(name):
    r = zt.resolve_recipe(zt.train_argv(name))
    expected = models.defaults(name) or {
        k: v for k, v in cli.RECIPES["fast99"].items() if k != "model"
    }
    for k, v in expected.items():
        got = r[k]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (
            list(v) if isinstance(v, tuple) else v
        ), k
    assert r["model"] == name and r["lr"] is not None and r["seed"] == 0
    assert zt.describe_recipe(r)
    assert zt.same_recipe(r, dict(r)) == []
    assert zt.same_recipe(r, dict(r, batch_size=7)) != []


def test_shortened_run_keeps_the_rest_of_the_recipe():
    full = zt.resolve_recipe(zt.train_argv("resnet8"))
    short = zt.resolve_recipe(zt.train_argv("resnet8", epochs=2))
    assert short["epochs"] == 2 and full["epochs"] == 10
    assert {k: v for k, v in short.items() if k != "epochs"} == {
        k: v for k, v in full.items() if k != "epochs"
    }


def test_key_batch():
    assert zt._key_batch("conv2d|(128, 16, 28, 28, 16, 3)|float32|t2") == 128
    assert zt._key_batch("nonsense") is None


def _side(acc, secs):
    return {
        "history": {"test_accuracy": acc, "seconds": secs},
        "warmup_seconds": 1.0,
        "total_seconds": sum(secs) + 2.0,
        "load_before": "0.1 0.1 0.1",
        "load_after": "0.2 0.1 0.1",
    }


def test_markdown_report():
    r = zt.resolve_recipe(zt.train_argv("lenet5", epochs=2))
    row = {
        "model": "lenet5",
        "parameters": 61706,
        "recipe": r,
        "recipe_text": zt.describe_recipe(r),
        "default_epochs": 10,
        "epochs": 2,
        "shortened": True,
        "fastconv_command": "fastconv train --model lenet5 --epochs 2",
        "order": ["fastconv", "torch"],
        "fastconv": _side([0.97, 0.98], [3.0, 3.0]),
        "torch": {
            "error": "exit status 1",
            "output_tail": ["boom"],
            "load_before": "1",
            "load_after": "1",
        },
        "initial_logits_max_abs_diff": 1e-7,
        "recipe_mismatch": [],
    }
    env = {
        "cpu": {"model": "CPU", "cores": 2, "flags": {"avx2": True, "avx512f": False}},
        "versions": {"python": "3", "numpy": "2", "numba": "0", "torch": "2", "fastconv": "0.1"},
        "git": {"commit": "abc1234", "subject": "s", "library_changes": []},
    }
    run = {
        "models": ["lenet5"],
        "command": "python benchmarks/zoo_table.py",
        "environment": env,
        "started": "2026-01-01 00:00",
        "finished": "2026-01-01 00:01",
        "wall_seconds": 60.0,
        "complete": True,
    }
    data = {
        "threads": 2,
        "seed": 0,
        "train_limit": None,
        "torch_malloc": "system",
        "environment": env,
        "runs": [run, dict(run, command="python benchmarks/zoo_table.py --merge")],
        "rows": [row],
        "shortened_note": "Time.",
        "superseded_rows": [dict(row, torch=_side([0.5, 0.6], [9.0, 9.5]))],
    }
    text = zt.markdown(data)
    assert "| lenet5 | 61,706 | 2 (10) **shortened** | **98.00** | failed |" in text
    assert "97.00, 98.00" in text and "Time." in text and "torch FAILED" in text
    assert "(run 2: lenet5): `python benchmarks/zoo_table.py --merge`" in text
    assert "| lenet5 | PyTorch | 2 | 50.00, 60.00 | 9.0, 9.5 |" in text
    assert "- Machine: CPU, 2 cores; ISA flags: avx2 yes, avx512f no." in text
    assert "Machines" not in text and "run |" not in text

    # a merge from another machine: one line per machine, and the run of every row
    other = dict(env, cpu=dict(env["cpu"], family=23, model_number=1, flags={"avx2": True}))
    row2 = dict(row, model="fast99", parameters=24986, shortened=False)
    merged = dict(
        data,
        runs=[
            dict(run, models=["lenet5", "fast99"]),
            dict(run, models=["lenet5"], environment=other),
        ],
        rows=[row, row2],
    )
    text = zt.markdown(merged)
    assert (
        "; the results table names each row's run): run 1: CPU, 2 cores; ISA flags: avx2 yes, "
        "avx512f no; run 2: CPU (family 23 model 1), 2 cores; ISA flags: avx2 yes." in text
    )
    assert "| PyTorch / fastconv median time | run |" in text
    cells = "| **98.00** | failed | 3.0 (3.0-3.0) | - | - |"
    assert f"| lenet5 | 61,706 | 2 (10) **shortened** {cells} 2 |" in text
    assert f"| fast99 | 24,986 | 2 (10) {cells} 1 |" in text
    assert zt.row_runs(merged) == {"lenet5": 2, "fast99": 1}


def test_merge_keeps_the_rows_a_run_has_not_finished():
    """A merge written between models (or after a stopped run) replaces only the rows of the
    models this run finished; the others keep their old row and the run they came from."""
    old_run = {"models": ["lenet5", "fast99"], "started": "2026-01-01 00:00"}
    old = {
        "threads": 2, "seed": 0, "train_limit": None, "warmup_steps": 3,
        "torch_malloc": "system", "runs": [old_run],
        "rows": [{"model": "lenet5", "acc": 1}, {"model": "fast99", "acc": 2}],
        "notes": "old note", "shortened_note": "",
    }  # fmt: skip
    this_run = {
        "models": ["lenet5", "fast99"], "started": "2026-02-02 00:00", "complete": False,
        "done": ["fast99"],
    }  # fmt: skip
    data = dict(old, runs=[this_run], rows=[{"model": "fast99", "acc": 3}], notes="")
    merged = zt.merge(old, data)
    assert merged["rows"] == [{"model": "lenet5", "acc": 1}, {"model": "fast99", "acc": 3}]
    assert merged["superseded_rows"] == [
        {"model": "fast99", "acc": 2, "superseded_at": "2026-02-02 00:00"}
    ]
    assert merged["runs"] == [old_run, this_run] and merged["notes"] == "old note"
    assert zt.row_runs(merged) == {"lenet5": 1, "fast99": 2}
    # runs recorded before ``done`` was kept: every model of the run counts as finished
    assert zt.row_runs({"runs": [old_run, {"models": ["fast99"]}]}) == {"lenet5": 1, "fast99": 2}
    with pytest.raises(SystemExit, match="other seed"):
        zt.merge(old, dict(data, seed=1))


def test_cpu_info_names_the_family_and_model():
    cpu = zt.cpu_info()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "cpu family" in text:
        assert isinstance(cpu["family"], int) and isinstance(cpu["model_number"], int)
        assert f"(family {cpu['family']} model {cpu['model_number']})" in zt.machine_text(cpu)
    assert cpu["cores"] == os.cpu_count() and "avx2" in cpu["flags"]


def test_torch_twins_take_the_zoo_state_dicts():
    torch = pytest.importorskip("torch")
    for name in ("resnet20", "inception_mini"):
        model = zt.fastconv_model(name, 0)
        twin = zt.torch_twin(name, model)  # load_state_dict is strict
        w = dict(model.state_dict())
        for k, v in twin.state_dict().items():
            assert np.array_equal(v.numpy(), np.asarray(w[k])), (name, k)
        assert isinstance(twin, torch.nn.Module)
