"""`make bench`: every benchmark, one after another, each printing its own table; what they
record() is written to bench/results.json."""

from __future__ import annotations

import argparse
import importlib
import sys

from bench import results

# (module, accepts --model)
BENCHMARKS = (
    ("bench.bench_engine", True),
    ("bench.bench_ep", True),
    ("bench.bench_transport", True),
    ("bench.bench_overlap", True),
    ("bench.bench_eplb", False),
    ("bench.bench_request_lb", False),
    ("bench.bench_cluster", True),
    ("bench.bench_prefix_cache", True),
    ("bench.bench_speculative", False),  # the trained demo model: its MTP layer is trained
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/v3-mini")
    ap.add_argument("--only", default="", help="comma-separated benchmark module names")
    args = ap.parse_args(argv)
    only = {x for x in args.only.split(",") if x}
    for name, takes_model in BENCHMARKS:
        if only and name.split(".")[-1] not in only and name not in only:
            continue
        print(f"\n=== {name} ===", flush=True)
        mod = importlib.import_module(name)
        mod.main(["--model", args.model] if takes_model else [])
        sys.stdout.flush()
    print(f"\nresults: {results.write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
