"""`epserve make-model`: write a small deterministic checkpoint."""

from __future__ import annotations

import argparse

from services.common.errors import CliError
from services.model.checkpoint_gen import make_model
from services.model.presets import PRESETS


def register(subparsers) -> None:
    p = subparsers.add_parser("make-model", help="generate a small DeepSeek-V3 checkpoint")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-mb", type=float, default=None,
                   help="write sharded safetensors with an index (default: one file)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise CliError("--seed must be >= 0")
    shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    out = make_model(args.preset, args.out, seed=args.seed, max_shard_bytes=shard)
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0
