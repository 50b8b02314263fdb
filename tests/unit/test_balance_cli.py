"""`epserve placement`: JSON output and input validation."""

import json

import numpy as np
import pytest

from services.balance.metrics import balancedness
from services.cli import main
from services.cli import placement as placement_cli


@pytest.fixture
def loads_file(tmp_path):
    rng = np.random.default_rng(0)
    loads = np.round(rng.lognormal(0, 1, (3, 32)) * 1000).tolist()
    path = tmp_path / "loads.json"
    path.write_text(json.dumps(loads))
    return path, loads


def run_json(capsys, *args):
    assert main(["placement", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_output_is_a_valid_placement(loads_file, capsys):
    path, loads = loads_file
    out = run_json(
        capsys,
        "--loads",
        str(path),
        "--replicas",
        "36",
        "--groups",
        "4",
        "--nodes",
        "2",
        "--gpus",
        "4",
    )
    assert out["policy"] == "hierarchical"
    assert out["slots_per_gpu"] == 9
    assert len(out["phy2log"]) == 3
    per_layer = []
    for row, layer in zip(out["phy2log"], loads, strict=True):
        assert len(row) == 36 and sorted(set(row)) == list(range(32))
        per_layer.append(balancedness(row, layer, 4))
    assert out["balancedness"] == pytest.approx(np.mean(per_layer))
    assert out["balancedness_per_layer"] == pytest.approx(per_layer, abs=1e-6)
    assert 0 < out["balancedness"] <= out["bound"] <= 1


def test_policy_flag_and_auto_fallback_to_global(loads_file, capsys):
    path, _ = loads_file
    out = run_json(
        capsys,
        "--loads",
        str(path),
        "--replicas",
        "36",
        "--groups",
        "4",
        "--nodes",
        "3",
        "--gpus",
        "6",
    )
    assert out["policy"] == "global"
    out = run_json(
        capsys,
        "--loads",
        str(path),
        "--replicas",
        "36",
        "--groups",
        "4",
        "--nodes",
        "2",
        "--gpus",
        "4",
        "--policy",
        "global",
    )
    assert out["policy"] == "global"


def test_text_summary(loads_file, capsys):
    path, _ = loads_file
    assert main(["placement", "--loads", str(path), "--replicas", "32", "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "balancedness" in out and "policy global" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "36", "--gpus", "5"], "--replicas (36) must be divisible by --gpus (5)"),
        (
            ["--replicas", "30", "--gpus", "5"],
            "--replicas (30) must be >= the number of experts (32)",
        ),
        (["--replicas", "36", "--gpus", "4", "--groups", "5"], "--groups (5) must divide"),
        (
            ["--replicas", "36", "--gpus", "4", "--nodes", "3"],
            "--gpus (4) must be divisible by --nodes (3)",
        ),
        (
            [
                "--replicas",
                "36",
                "--gpus",
                "6",
                "--nodes",
                "3",
                "--groups",
                "4",
                "--policy",
                "hierarchical",
            ],
            "needs --groups (4) divisible by --nodes (3)",
        ),
        (["--replicas", "36", "--gpus", "0"], "--gpus must be >= 1"),
    ],
)
def test_shape_errors_exit_2_with_one_line(loads_file, capsys, args, message):
    path, _ = loads_file
    assert main(["placement", "--loads", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ("{}", "non-empty list of layers"),
        ("[]", "non-empty list of layers"),
        ("[[1, 2], [3]]", "layer 1 has 1 experts, layer 0 has 2"),
        ("[[1, -2]]", "layer 0 expert 1: load must be a finite number >= 0"),
        ('[[1, "x"]]', "load must be a finite number"),
        ("[[1, true]]", "load must be a finite number"),
        ("[5]", "layer 0 must be a non-empty list"),
    ],
)
def test_bad_loads_files(tmp_path, capsys, content, message):
    path = tmp_path / "loads.json"
    path.write_text(content)
    assert main(["placement", "--loads", str(path), "--replicas", "2", "--gpus", "1"]) == 2
    assert message in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    assert (
        main(
            ["placement", "--loads", str(tmp_path / "nope.json"), "--replicas", "2", "--gpus", "1"]
        )
        == 2
    )
    assert "cannot read loads file" in capsys.readouterr().err


def test_non_finite_values_rejected_before_planning():
    with pytest.raises(placement_cli.CliError, match="finite"):
        placement_cli.check_loads([[1.0, float("inf")]], "x")
