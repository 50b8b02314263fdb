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
    p.add_argument("--fp8", action="store_true",
                   help="FP8 block-quantised linears (e4m3 + weight_scale_inv), as DeepSeek ships V3")
    p.add_argument("--fp8-block", type=int, default=128,
                   help="rows and columns of one FP8 scale block (default 128, DeepSeek's)")
    p.add_argument("--tokenizer-size", type=int, default=None,
                   help="ids the tokenizer knows, fewer than vocab_size as in DeepSeek-V3 "
                        "(default: vocab_size)")
    p.add_argument("--mtp", action="store_true",
                   help="add V3's multi-token-prediction layer (num_nextn_predict_layers 1), "
                        "the draft for `--speculative mtp`")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise CliError("--seed must be >= 0")
    if args.fp8_block <= 0:
        raise CliError("--fp8-block must be > 0")
    shard = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    try:
        out = make_model(args.preset, args.out, seed=args.seed, max_shard_bytes=shard,
                         fp8_block=args.fp8_block if args.fp8 else None,
                         tokenizer_size=args.tokenizer_size, mtp=args.mtp)
    except ValueError as exc:  # a tokenizer size the preset cannot take
        raise CliError(str(exc)) from exc
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0
