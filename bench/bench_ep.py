"""Expert parallelism over gRPC: wire bytes per mode, decode speed, memory per worker.

Runs in one process tree on one machine: the local reference engine and the EP engine with
1, 2 and 4 expert-worker processes decode the same batch, side by side. On a 2-core machine
the workers share the cores with the attention process, so the ratio shows the data plane's
overhead, not the speed-up of real parallel GPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from pathlib import Path

import grpc
import torch

from bench.results import record
from services.balance.naive import contiguous_placement
from services.engine.ep_client import ExpertClient
from services.engine.ep_engine import EPEngine
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.engine.wire import encode
from services.local.expert_workers import LocalExpertWorkers
from services.model.config import ModelConfig
from services.model.deepseek import no_experts
from services.model.loader import load_model
from services.protos_gen.epserve.v1 import expert_pb2, expert_pb2_grpc

FULL_MODEL_RSS = """
import torch, sys
from pathlib import Path
from services.model.loader import load_model
m = load_model(sys.argv[1])
rss = [l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS')]
print(int(rss[0].split()[1]) * 1024)
"""


def _requests(cfg, batch, prompt_len, new_tokens):
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    return [GenerationRequest(f"b{i}", torch.randint(5, cfg.vocab_size, (prompt_len,), generator=g).tolist(),
                              params) for i in range(batch)]


def wire_table(cfg) -> None:
    x = torch.randn(64, cfg.hidden_size)
    k = cfg.num_experts_per_tok
    slots = torch.zeros(64, k, dtype=torch.int32)
    print(f"\nbytes per token copy per MoE layer (hidden {cfg.hidden_size}, top-{k}; "
          "payload only, a token goes to each worker holding one of its experts)")
    print(f"{'wire':<6}{'dispatch hidden':>17}{'+ slots/weights':>17}{'combine':>10}")
    rows = {}
    for wire, (d, c) in {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"),
                         "fp8": ("fp8", "bf16")}.items():
        hidden = encode(x, d).nbytes / 64
        meta = (encode(slots, "int32").nbytes + encode(slots.float(), "fp32").nbytes) / 64
        combine = encode(x, c).nbytes / 64
        rows[wire] = hidden
        print(f"{wire:<6}{hidden:>17.0f}{hidden + meta:>17.0f}{combine:>10.0f}")
    print(f"fp8 / bf16 dispatch hidden bytes: {rows['fp8'] / rows['bf16']:.3f}")
    record("ep", "fp8_over_bf16_dispatch_bytes", round(rows["fp8"] / rows["bf16"], 4))


async def _ep_decode(model, endpoints, reqs, wire):
    client = await ExpertClient.connect(endpoints, wire=wire)
    try:
        engine = EPEngine(model, client)
        await engine.generate(reqs)
        moe_layers = len(model.cfg.moe_layer_ids)
        tokens = engine.stats.prefill_tokens + engine.stats.decode_tokens
        per_token = client.bytes_sent / (tokens * moe_layers), client.bytes_received / (tokens * moe_layers)
        return engine.stats.decode_tok_s, per_token
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    # One event loop for the whole run: grpc.aio binds to the loop that first uses it.
    return asyncio.run(_main(argv))


async def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/v3-mini")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    cfg = ModelConfig.from_dir(args.model)
    wire_table(cfg)
    reqs = _requests(cfg, args.batch, args.prompt_len, args.new_tokens)
    full = load_model(args.model)
    attn = load_model(args.model, experts=no_experts(cfg))
    full_rss = int(subprocess.run([sys.executable, "-c", FULL_MODEL_RSS, args.model],
                                  capture_output=True, text=True, check=True).stdout)
    ckpt_bytes = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    print(f"\ndecode tok/s, batch {args.batch}, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'engine':<26}{'tok/s':>9}{'vs local':>10}{'sent B/tok/layer':>18}{'recv':>8}"
          f"{'worker RSS MB':>15}{'vs full-model process':>23}")
    for n in [int(w) for w in args.workers.split(",")]:
        table = contiguous_placement(cfg.n_routed_experts, n, cfg.moe_layer_ids)
        with LocalExpertWorkers(args.model, table) as pool:
            rss, read = [], []
            for target in pool.endpoints:
                with grpc.insecure_channel(target) as ch:
                    info = expert_pb2_grpc.ExpertWorkerStub(ch).Info(expert_pb2.WorkerInfoRequest())
                rss.append(info.resident_bytes)
                read.append(info.expert_bytes_read)
            print(f"  {n} worker(s): each read at most {max(read) / 2**20:.1f} MB of expert weights "
                  f"of a {ckpt_bytes / 2**20:.1f} MB checkpoint ({max(read) / ckpt_bytes:.0%})")
            for wire in ("fp32", "fp8"):
                local, ep, per_token = [], [], (0, 0)
                for _ in range(args.repeats):  # alternate the two, same machine state
                    eng = ReferenceEngine(full)
                    eng.generate(reqs)
                    local.append(eng.stats.decode_tok_s)
                    tok_s, per_token = await _ep_decode(attn, pool.endpoints, reqs, wire)
                    ep.append(tok_s)
                lo, e = statistics.median(local), statistics.median(ep)
                print(f"{f'EP {n} worker(s), {wire}':<26}{e:>9.1f}{e / lo:>9.2f}x"
                      f"{per_token[0]:>18.0f}{per_token[1]:>8.0f}"
                      f"{max(rss) / 2**20:>15.0f}{max(rss) / full_rss:>22.2f}x")
                record("ep", f"decode_vs_local_{n}w_{wire}", round(e / lo, 3))
            record("ep", f"worker_rss_vs_full_{n}w", round(max(rss) / full_rss, 3))
    print(f"local reference engine decode: {lo:.1f} tok/s (last measurement); "
          f"full-model process RSS {full_rss / 2**20:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
