"""The transport floor beside the EP round trip (issue 15, part 1: know the floor).

Same run, same machine, for a batch of T tokens at one MoE layer:

- floor: a bare gRPC bidirectional stream (bench/echo_server.py, its own process) sending a
  request of the DispatchRequest's size and answering with the DispatchResponse's size, raw
  bytes, no protobuf: what any gRPC data plane between two Python processes costs;
- EP: ExpertClient.dispatch of that layer to one expert-worker process holding every expert
  (plan, encode, protobuf, the worker's decode, grouped SwiGLU and encode, the combine), split
  into the worker's own compute time and the rest (overhead);
- overhead / floor: how far the EP path's non-compute cost is from the transport's;
- busy floor: the same stream with the echo server spinning for the worker's median compute
  time before answering. While a worker computes, the attention process sleeps, and a process
  woken after milliseconds asleep pays more (cold caches, a vCPU the host descheduled) than one
  in a tight ping-pong: measured on this 2-core VM, a bare echo's round trip minus its spin
  grows from 0.3 ms at 0 ms to 0.9 ms at 12 ms of spin. overhead / busy floor compares the EP
  path with a transport that waits as long, so it counts only what the EP path adds.

Medians of ITERS round trips after a warm-up, each on an open stream.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from bench.echo_server import METHOD
from bench.results import record
from services.balance.naive import contiguous_placement
from services.common.channels import CHANNEL_OPTIONS
from services.engine.ep_client import ExpertClient
from services.engine.tensor_proto import to_proto
from services.engine.wire import encode
from services.local.expert_workers import LocalExpertWorkers
from services.model.config import ModelConfig
from services.protos_gen.epserve.v1 import expert_pb2, tensor_pb2

BATCHES = (1, 8, 32, 64, 256)
ITERS, WARMUP = 60, 10


def message_sizes(cfg: ModelConfig, tokens: int) -> tuple[int, int]:
    """Serialized DispatchRequest and DispatchResponse bytes for `tokens` tokens (fp32)."""
    k = cfg.num_experts_per_tok
    req = expert_pb2.DispatchRequest(
        step_id=1, layer_id=1, placement_version=1, combine_dtype=tensor_pb2.DTYPE_FP32,
        hidden=to_proto(encode(torch.zeros(tokens, cfg.hidden_size), "fp32")),
        slots=to_proto(encode(torch.zeros(tokens, k, dtype=torch.int32), "int32")),
        weights=to_proto(encode(torch.zeros(tokens, k), "fp32")))
    resp = expert_pb2.DispatchResponse(
        step_id=1, layer_id=1, combined=to_proto(encode(torch.zeros(tokens, cfg.hidden_size),
                                                        "fp32")))
    return req.ByteSize(), resp.ByteSize()


async def floor_seconds(target: str, request_bytes: int, response_bytes: int,
                        busy_s: float = 0.0) -> float:
    """Median round trip minus `busy_s`, the time the echo server spins before answering."""
    header = response_bytes.to_bytes(8, "little") + round(busy_s * 1e6).to_bytes(8, "little")
    payload = header + bytes(max(request_bytes - len(header), 0))
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        call = ch.stream_stream(METHOD, request_serializer=None, response_deserializer=None)()
        times = []
        for i in range(WARMUP + ITERS):
            t0 = time.perf_counter()
            await call.write(payload)
            await call.read()
            if i >= WARMUP:
                times.append(time.perf_counter() - t0 - busy_s)
        await call.done_writing()
        return statistics.median(times)


async def ep_seconds(client: ExpertClient, cfg: ModelConfig, tokens: int
                     ) -> tuple[float, float]:
    """(median round trip, median worker compute) of one layer's dispatch + combine."""
    g = torch.Generator().manual_seed(tokens)
    layer, k = cfg.moe_layer_ids[0], cfg.num_experts_per_tok
    x = torch.randn(tokens, cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:k]
                       for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    rounds, computes = [], []
    for i in range(WARMUP + ITERS):
        t0 = time.perf_counter()
        pending = await client.start_dispatch(client.new_step(), 0, layer, x, ids, weights)
        await pending.result()
        if i >= WARMUP:
            rounds.append(time.perf_counter() - t0)
            computes.append(sum(t.compute_s for t in pending.workers))
    return statistics.median(rounds), statistics.median(computes)


def start_echo(tmp: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "echo.port"
    proc = subprocess.Popen([sys.executable, "-m", "bench.echo_server", "--port-file",
                             str(port_file)])
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("the echo server did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text()}"


async def run(model_dir: str) -> None:
    cfg = ModelConfig.from_dir(model_dir)
    table = contiguous_placement(cfg.n_routed_experts, 1, cfg.moe_layer_ids)
    workers = LocalExpertWorkers(model_dir, table)
    with tempfile.TemporaryDirectory() as tmp:
        echo, target = start_echo(Path(tmp))
        try:
            endpoints = await asyncio.to_thread(workers.start)
            client = await ExpertClient.connect(endpoints, wire="fp32")
            try:
                print(f"\ntransport floor vs EP round trip, one MoE layer, fp32, 1 worker "
                      f"(hidden {cfg.hidden_size}, top-{cfg.num_experts_per_tok}; medians of "
                      f"{ITERS})")
                print(f"{'tokens':>7}{'req KB':>9}{'floor ms':>10}{'EP ms':>9}{'compute':>9}"
                      f"{'overhead':>10}{'overhead/floor':>16}{'busy floor':>12}"
                      f"{'overhead/busy':>15}")
                for tokens in BATCHES:
                    req_b, resp_b = message_sizes(cfg, tokens)
                    floor = await floor_seconds(target, req_b, resp_b)
                    total, compute = await ep_seconds(client, cfg, tokens)
                    busy = await floor_seconds(target, req_b, resp_b, busy_s=compute)
                    overhead = max(total - compute, 0.0)
                    ratio = overhead / floor if floor else float("nan")
                    busy_ratio = overhead / busy if busy > 0 else float("nan")
                    print(f"{tokens:>7}{req_b / 1024:>9.1f}{floor * 1e3:>10.3f}"
                          f"{total * 1e3:>9.3f}{compute * 1e3:>9.3f}{overhead * 1e3:>10.3f}"
                          f"{ratio:>15.2f}x{busy * 1e3:>12.3f}{busy_ratio:>14.2f}x")
                    record("transport", f"ep_overhead_over_floor_t{tokens}", round(ratio, 3))
                    record("transport", f"ep_overhead_over_busy_floor_t{tokens}",
                           round(busy_ratio, 3))
                    record("transport", f"floor_ms_t{tokens}", round(floor * 1e3, 4))
                    record("transport", f"busy_floor_ms_t{tokens}", round(busy * 1e3, 4))
                    record("transport", f"ep_ms_t{tokens}", round(total * 1e3, 4))
            finally:
                await client.close()
        finally:
            workers.stop()
            echo.kill()
            echo.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    asyncio.run(run(args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
