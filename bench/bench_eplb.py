"""EPLB benchmark: balancedness of expert placements on DeepSeek-V3-shaped loads.

Loads: torch.manual_seed(0); w = round(LogNormal(0, 1).sample((58, 256)) * 1000) — 58 MoE layers x
256 experts in 8 groups. Balancedness = mean GPU load / max GPU load, averaged over layers.
The perturbed column evaluates the plan made on w against w x LogNormal(0, 0.25) (drawn next from
the same generator): how much of the balance survives when the loads drift after planning.

Real loads: the trained demo model's per-expert loads over its held-out plays
(checkpoints/bard-moe/expert_loads.json, measured by `epserve train`: its MoE layers x 64
experts in 8 groups, real routing skew), on a unit sized for 64 experts. There the perturbed
column is real drift: the plan is made on one held-out play's loads and evaluated on the
other's.

Run: .venv/bin/python -m bench.bench_eplb [--real-loads DIR]
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import results
from services.balance.eplb import EplbConfig, Policy, plan
from services.balance.metrics import balancedness_of_loads, worker_loads
from services.balance.naive import contiguous_placement
from services.train.expert_loads import ExpertLoads


@dataclass(frozen=True)
class Unit:
    name: str
    slots: int  # R
    groups: int  # G
    nodes: int  # N
    gpus: int  # M


PREFILL = Unit("prefill", 288, 8, 4, 32)
DECODE = Unit("decode", 288, 8, 18, 144)

# For the demo model's 64 experts: 2 nodes x 4 GPUs, 80 slots (16 redundant), 8 groups.
REAL = Unit("bard-moe", 80, 8, 2, 8)
REAL_LOADS_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "bard-moe"

# DeepSeek's published EPLB on these loads, for comparison (the brief's figures).
DEEPSEEK_REPORTED = {"prefill": (0.926, 1.000), "decode": (0.755, 0.773)}


def real_loads(model_dir: Path) -> tuple[np.ndarray, np.ndarray, str, list[int]]:
    """(plan-on loads, evaluate-on loads, what they are, layer ids) from a model's
    expert_loads.json: two held-out parts when it has them, else the whole text for both."""
    loads = ExpertLoads.from_dir(model_dir)
    layer_ids = sorted(loads.layers)
    parts = sorted(loads.parts.items())
    if len(parts) >= 2:
        (a, first), (b, second) = parts[0], parts[1]
        return (np.asarray(first.matrix(), dtype=np.float64),
                np.asarray(second.matrix(), dtype=np.float64),
                f"planned on {a}'s loads; perturbed = evaluated on {b}'s", layer_ids)
    whole = np.asarray(loads.matrix(), dtype=np.float64)
    return whole, whole, loads.source, layer_ids


def skew_lines(loads: np.ndarray, layer_ids: list[int]) -> list[str]:
    """Per layer: how uneven the experts themselves are (before any placement)."""
    return [f"  layer {i}: hottest expert {w.max() / w.mean():.2f}x the mean, coldest "
            f"{w.min() / w.mean():.2f}x, expert balancedness (mean/max) {w.mean() / w.max():.3f}"
            for i, w in zip(layer_ids, loads, strict=True)]


def make_loads(layers: int = 58, experts: int = 256) -> tuple[np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    w = torch.round(torch.distributions.LogNormal(0.0, 1.0).sample((layers, experts)) * 1000)
    noise = torch.distributions.LogNormal(0.0, 0.25).sample((layers, experts))
    return w.double().numpy(), (w * noise).double().numpy()


# ---- evaluation -------------------------------------------------------------------------------


def gpu_loads_of_groups(groups: list[np.ndarray], loads: np.ndarray) -> np.ndarray:
    """Per-GPU load when GPU g holds the (unreplicated) experts groups[g]."""
    return np.array([loads[g].sum() for g in groups])


def evaluate(phy2log: np.ndarray, loads: np.ndarray, gpus: int) -> float:
    return float(
        np.mean(
            [
                balancedness_of_loads(worker_loads(p, w, gpus))
                for p, w in zip(phy2log, loads, strict=True)
            ]
        )
    )


def replica_bound(phy2log: np.ndarray, loads: np.ndarray, gpus: int) -> float:
    """mean / max(mean, heaviest replica) with the plan's own replica counts, per layer."""
    values = []
    for p, w in zip(phy2log, loads, strict=True):
        counts = np.bincount(p, minlength=w.size)
        mean = w.sum() / gpus
        values.append(mean / max(mean, float((w / counts).max())))
    return float(np.mean(values))


def node_bound(phy2log: np.ndarray, loads: np.ndarray, unit: Unit) -> float:
    """For a hierarchical plan: no GPU can beat its node's mean, so the heaviest node bounds it."""
    values = []
    for p, w in zip(phy2log, loads, strict=True):
        per_gpu = worker_loads(p, w, unit.gpus)
        per_node = per_gpu.reshape(unit.nodes, -1).mean(axis=1)
        values.append(per_gpu.mean() / per_node.max())
    return float(np.mean(values))


# ---- baselines --------------------------------------------------------------------------------


def naive_no_redundancy(loads: np.ndarray, unit: Unit) -> tuple[float, float]:
    """Experts split contiguously over the GPUs, no copies (decode: 112 GPUs hold 2, 32 hold 1)."""
    groups = np.array_split(np.arange(loads.shape[1]), unit.gpus)
    return tuple(  # type: ignore[return-value]
        float(np.mean([balancedness_of_loads(gpu_loads_of_groups(groups, w)) for w in sample]))
        for sample in (loads, loads)
    )


def greedy_reference(loads: np.ndarray, unit: Unit) -> np.ndarray:
    """DeepSeek-EPLB-style greedy, re-implemented from its description for comparison: groups
    onto nodes heaviest-first, replicas to the highest load/replicas, replicas onto GPUs
    heaviest-first to the least-loaded GPU with a free slot. Global when G % N != 0."""
    groups, nodes = (unit.groups, unit.nodes) if unit.groups % unit.nodes == 0 else (1, 1)
    rows = []
    for w in loads:
        group_size = w.size // groups
        node_of_group = _greedy_pack(w.reshape(groups, group_size).sum(axis=1), nodes)
        row = []
        for node in range(nodes):
            experts = np.concatenate(
                [
                    np.arange(g * group_size, (g + 1) * group_size)
                    for g in np.flatnonzero(node_of_group == node)
                ]
            )
            counts = np.ones(experts.size, dtype=np.int64)
            for _ in range(unit.slots // nodes - experts.size):
                counts[np.argmax(w[experts] / counts)] += 1
            replicas = np.repeat(np.arange(experts.size), counts)
            gpu = _greedy_pack(w[experts][replicas] / counts[replicas], unit.gpus // nodes)
            row.extend(experts[replicas[np.argsort(gpu, kind="stable")]])
        rows.append(row)
    return np.asarray(rows)


def _greedy_pack(weights: np.ndarray, bins: int) -> np.ndarray:
    capacity = weights.size // bins
    load, count = np.zeros(bins), np.zeros(bins, dtype=np.int64)
    out = np.empty(weights.size, dtype=np.int64)
    for item in np.argsort(-weights, kind="stable"):
        open_bins = np.flatnonzero(count < capacity)
        target = open_bins[np.argmin(load[open_bins])]
        out[item], load[target], count[target] = (
            target,
            load[target] + weights[item],
            count[target] + 1,
        )
    return out


# ---- table ------------------------------------------------------------------------------------


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def rows_for(unit: Unit, loads: np.ndarray, perturbed: np.ndarray) -> list[tuple]:
    experts = loads.shape[1]
    rows = []
    base, _ = naive_no_redundancy(loads, unit)
    base_p, _ = naive_no_redundancy(perturbed, unit)
    rows.append(("naive contiguous, no redundancy", base, base_p, float("nan"), float("nan"), 0.0))

    def add(label: str, fn: Callable[[], np.ndarray], hierarchical: bool) -> None:
        phy2log, seconds = timed(fn)
        nb = node_bound(phy2log, loads, unit) if hierarchical else float("nan")
        rows.append(
            (
                label,
                evaluate(phy2log, loads, unit.gpus),
                evaluate(phy2log, perturbed, unit.gpus),
                replica_bound(phy2log, loads, unit.gpus),
                nb,
                seconds,
            )
        )

    redundant = unit.slots - experts
    add(
        f"naive contiguous + {redundant} copies of hottest",
        lambda: contiguous_placement(
            experts, unit.gpus, range(len(loads)), redundant, loads
        ).phy2log_array(),
        False,
    )
    hier = unit.groups % unit.nodes == 0
    add("greedy (DeepSeek EPLB style, re-implemented)", lambda: greedy_reference(loads, unit), hier)
    for policy in (Policy.HIERARCHICAL, Policy.GLOBAL) if hier else (Policy.GLOBAL,):
        config = EplbConfig(unit.slots, unit.gpus, unit.nodes, unit.groups, policy)
        add(
            f"planner, {policy.value}",
            lambda config=config: plan(loads, config).phy2log_array(),
            policy is Policy.HIERARCHICAL,
        )
        replanned = evaluate(plan(perturbed, config).phy2log_array(), perturbed, unit.gpus)
        rows.append(
            (
                f"  (re-planned on the perturbed loads, {policy.value})",
                float("nan"),
                replanned,
                float("nan"),
                float("nan"),
                float("nan"),
            )
        )
    return rows


def fmt(value: float, digits: int = 4) -> str:
    return "-" if np.isnan(value) else f"{value:.{digits}f}"


def print_table(unit: Unit, rows: list[tuple]) -> None:
    reported = ""
    if unit.name in DEEPSEEK_REPORTED:
        value, bound = DEEPSEEK_REPORTED[unit.name]
        reported = f" (DeepSeek EPLB reported {value:.3f}, bound {bound:.3f})"
    print(f"\n{unit.name} unit: R={unit.slots} G={unit.groups} N={unit.nodes} M={unit.gpus}"
          f"{reported}")
    header = (
        f"{'placement':48} {'balanced':>9} {'perturbed':>9} {'bound':>7} {'node-bnd':>8} {'sec':>6}"
    )
    print(header)
    print("-" * len(header))
    for label, value, pert, bnd, nb, sec in rows:
        print(
            f"{label:48} {fmt(value):>9} {fmt(pert):>9} {fmt(bnd):>7} {fmt(nb):>8} {fmt(sec, 2):>6}"
        )
        slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
        for what, v in (("balancedness", value), ("perturbed", pert), ("bound", bnd),
                        ("node_bound", nb)):
            if not np.isnan(v):
                results.record("eplb", f"{unit.name}_{slug}_{what}", round(float(v), 4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_eplb", description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=58, help="MoE layers to use (58)")
    parser.add_argument("--real-loads", type=Path, default=REAL_LOADS_DIR,
                        help="a checkpoint dir with expert_loads.json (the demo model's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loads, perturbed = make_loads()
    loads, perturbed = loads[: args.layers], perturbed[: args.layers]
    print("balancedness = mean GPU load / max GPU load, mean over layers")
    print("bound = mean / max(mean, heaviest replica) with the row's replica counts;")
    print("node-bnd = hierarchical ceiling: heaviest node's mean GPU load (groups stay on nodes)")
    for unit in (PREFILL, DECODE):
        print_table(unit, rows_for(unit, loads, perturbed))
    if (args.real_loads / "expert_loads.json").is_file():
        plan_on, evaluate_on, what, layer_ids = real_loads(args.real_loads)
        print(f"\nreal loads: {args.real_loads.name}'s experts over its held-out text, "
              f"{plan_on.shape[0]} MoE layers x {plan_on.shape[1]} experts; {what}")
        for line in skew_lines(plan_on, layer_ids):
            print(line)
        print_table(REAL, rows_for(REAL, plan_on, evaluate_on))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
