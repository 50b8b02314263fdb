"""`epserve placement`: plan expert placement from a loads file.

The only I/O of services/balance lives here: read the JSON file, print the result.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from services.balance.eplb import EplbConfig, Policy, plan
from services.balance.metrics import balancedness, replica_bound
from services.common.errors import CliError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "placement",
        help="plan expert replication and placement (EPLB) from per-layer expert loads",
        description=(
            "Replicate and place the experts of every MoE layer so that the heaviest GPU is as "
            "light as possible. Slot p of a layer lives on GPU p // (R / M)."
        ),
    )
    parser.add_argument(
        "--loads",
        required=True,
        type=Path,
        metavar="FILE",
        help="JSON: a list of layers, each a list of per-expert loads",
    )
    parser.add_argument("--replicas", required=True, type=int, metavar="R", help="slots per layer")
    parser.add_argument("--groups", type=int, default=1, metavar="G", help="expert groups")
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes")
    parser.add_argument("--gpus", required=True, type=int, metavar="M", help="expert GPUs")
    parser.add_argument(
        "--policy", choices=[p.value for p in Policy], default=Policy.AUTO.value, help="(auto)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def read_loads(path: Path) -> list[list[float]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read loads file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"loads file {path} is not JSON: {exc.msg} at line {exc.lineno}") from None
    return check_loads(data, str(path))


def check_loads(data, source: str) -> list[list[float]]:
    if not isinstance(data, list) or not data:
        raise CliError(f"{source}: expected a non-empty list of layers")
    width = None
    for index, layer in enumerate(data):
        if not isinstance(layer, list) or not layer:
            raise CliError(f"{source}: layer {index} must be a non-empty list of expert loads")
        if width is not None and len(layer) != width:
            raise CliError(f"{source}: layer {index} has {len(layer)} experts, layer 0 has {width}")
        width = len(layer)
        for expert, value in enumerate(layer):
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value < 0:
                raise CliError(
                    f"{source}: layer {index} expert {expert}: load must be a finite number "
                    f">= 0, got {value!r}"
                )
    return data


def check_shape(args: argparse.Namespace, num_experts: int) -> None:
    for flag in ("replicas", "groups", "nodes", "gpus"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag} must be >= 1")
    r, g, n, m = args.replicas, args.groups, args.nodes, args.gpus
    if r % m != 0:
        raise CliError(f"--replicas ({r}) must be divisible by --gpus ({m})")
    if m % n != 0:
        raise CliError(f"--gpus ({m}) must be divisible by --nodes ({n})")
    if r < num_experts:
        raise CliError(f"--replicas ({r}) must be >= the number of experts ({num_experts})")
    if num_experts % g != 0:
        raise CliError(f"--groups ({g}) must divide the number of experts ({num_experts})")
    if args.policy == Policy.HIERARCHICAL.value and g % n != 0:
        raise CliError(f"--policy hierarchical needs --groups ({g}) divisible by --nodes ({n})")


def run(args: argparse.Namespace) -> int:
    loads = np.asarray(read_loads(args.loads), dtype=np.float64)
    check_shape(args, loads.shape[1])
    try:
        config = EplbConfig(
            num_slots=args.replicas,
            num_workers=args.gpus,
            num_nodes=args.nodes,
            num_groups=args.groups,
            policy=Policy(args.policy),
        )
        table = plan(loads, config)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    phy2log = table.phy2log_array()
    per_layer = [balancedness(p, w, args.gpus) for p, w in zip(phy2log, loads, strict=True)]
    bounds = [
        replica_bound(w, np.bincount(p, minlength=w.size), args.gpus)
        for p, w in zip(phy2log, loads, strict=True)
    ]
    result = {
        "policy": config.resolved_policy.value,
        "replicas": args.replicas,
        "groups": args.groups,
        "nodes": args.nodes,
        "gpus": args.gpus,
        "slots_per_gpu": config.slots_per_worker,
        "balancedness": float(np.mean(per_layer)),
        "balancedness_per_layer": [round(b, 6) for b in per_layer],
        "bound": float(np.mean(bounds)),
        "phy2log": [list(row) for row in table.phy2log],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print_summary(result)
    return 0


def print_summary(result: dict) -> None:
    print(
        f"policy {result['policy']}: {len(result['phy2log'])} layers, {result['replicas']} slots "
        f"on {result['gpus']} GPUs ({result['slots_per_gpu']} each), {result['nodes']} nodes"
    )
    print(f"balancedness (mean/max GPU load, mean over layers): {result['balancedness']:.4f}")
    print(f"bound mean/max(mean, heaviest replica):               {result['bound']:.4f}")
    print("use --json for the placement itself (phy2log)")
