"""LinkProxy between real sockets: integrity, latency, pipelining, bandwidth, drop, stall, gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.cpu_cores import CPU_CORES_ENV
from services.common.health import add_health, check_health
from services.local.link_proxy import ControlServer, LinkProxy, send_control, send_control_async
from services.local.procs import ServiceProcess, child_env, epserve_argv

pytestmark = pytest.mark.timeout(60)


class EchoServer:
    """Echoes every byte back; counts open connections so a test can see upstream closes."""

    def __init__(self) -> None:
        self.open = 0
        self.server: asyncio.Server | None = None

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.open += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    async def __aenter__(self) -> EchoServer:
        self.server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()


@contextlib.asynccontextmanager
async def proxied_echo(**link):
    async with EchoServer() as echo:
        async with LinkProxy("127.0.0.1", 0, "127.0.0.1", echo.port, **link) as proxy:
            yield echo, proxy


async def open_client(proxy: LinkProxy):
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def wait_until(condition, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.005)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_bytes_arrive_intact_on_concurrent_connections():
    payloads = [os.urandom(300_000 + i) for i in range(4)]
    async with proxied_echo(latency_ms=1.0) as (_echo, proxy):

        async def roundtrip(payload: bytes) -> bytes:
            reader, writer = await open_client(proxy)
            writer.write(payload)
            writer.write_eof()  # the half-close must travel through the proxy as well
            data = await asyncio.wait_for(reader.read(-1), 10.0)
            await close(writer)
            return data

        echoed = await asyncio.gather(*(roundtrip(p) for p in payloads))
        assert echoed == payloads
        assert proxy.stats.bytes_by_direction["upstream"] == sum(map(len, payloads))
        assert proxy.stats.bytes_by_direction["downstream"] == sum(map(len, payloads))


async def test_round_trip_takes_at_least_twice_the_latency():
    latency_ms = 30.0
    async with proxied_echo(latency_ms=latency_ms) as (_echo, proxy):
        reader, writer = await open_client(proxy)
        try:
            rtts = []
            for i in range(5):
                started = time.perf_counter()
                writer.write(b"ping%d" % i)
                assert await asyncio.wait_for(reader.readexactly(5), 5.0) == b"ping%d" % i
                rtts.append((time.perf_counter() - started) * 1000)
        finally:
            await close(writer)
    assert min(rtts) >= 2 * latency_ms
    assert sorted(rtts)[2] < 2 * latency_ms + 40, rtts  # median: added latency, not much more


async def test_latency_is_a_pipeline_not_a_per_chunk_wait():
    latency_ms, count, gap_s = 50.0, 20, 0.005
    async with proxied_echo(latency_ms=latency_ms) as (_echo, proxy):
        reader, writer = await open_client(proxy)
        try:
            started = time.perf_counter()
            for i in range(count):
                writer.write(b"%04d" % i)
                await writer.drain()
                await asyncio.sleep(gap_s)  # the sender's pace, part of the scenario
            data = await asyncio.wait_for(reader.readexactly(4 * count), 10.0)
            elapsed = time.perf_counter() - started
        finally:
            await close(writer)
    assert data == b"".join(b"%04d" % i for i in range(count))  # in order
    # Serialised delivery would need count * 2 * latency = 2 s; a pipeline needs about
    # count * gap + 2 * latency = 0.2 s.
    assert 2 * latency_ms / 1000 <= elapsed < 0.6, elapsed


async def test_bandwidth_limit_paces_a_bulk_transfer():
    mbps, nbytes = 16.0, 400_000  # 0.2 s on the wire each way, the two ways overlapping
    async with proxied_echo(bandwidth_mbps=mbps) as (_echo, proxy):
        reader, writer = await open_client(proxy)
        try:
            started = time.perf_counter()
            writer.write(b"x" * nbytes)
            await asyncio.wait_for(reader.readexactly(nbytes), 10.0)
            elapsed = time.perf_counter() - started
        finally:
            await close(writer)
    wire_s = nbytes * 8 / (mbps * 1e6)
    assert wire_s * 0.95 <= elapsed < wire_s * 2 + 0.3, elapsed


async def test_drop_closes_both_ends_and_new_connections_still_work():
    async with proxied_echo() as (echo, proxy):
        readers, writers = [], []
        for _ in range(3):
            reader, writer = await open_client(proxy)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.readexactly(5), 5.0) == b"hello"
            readers.append(reader)
            writers.append(writer)
        assert echo.open == 3 and proxy.open_connections == 3

        assert proxy.drop() == 3
        for reader in readers:
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5.0) == b""  # EOF (or reset)
        await wait_until(lambda: echo.open == 0 and proxy.open_connections == 0)
        for writer in writers:
            await close(writer)

        reader, writer = await open_client(proxy)
        writer.write(b"again")
        assert await asyncio.wait_for(reader.readexactly(5), 5.0) == b"again"
        await close(writer)


async def test_stall_holds_bytes_then_resume_delivers_everything_in_order():
    async with proxied_echo(latency_ms=2.0) as (echo, proxy):
        reader, writer = await open_client(proxy)
        try:
            proxy.stall()
            payload = os.urandom(200_000)
            writer.write(payload)
            await writer.drain()
            with pytest.raises(TimeoutError):  # nothing gets through while stalled
                await asyncio.wait_for(reader.readexactly(1), 0.3)
            assert echo.open == 1 and proxy.open_connections == 1  # still connected
            proxy.resume()
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 5.0) == payload
        finally:
            await close(writer)


async def test_latency_and_bandwidth_change_at_runtime():
    async with proxied_echo() as (_echo, proxy):
        reader, writer = await open_client(proxy)
        try:
            proxy.set_latency(40.0)
            started = time.perf_counter()
            writer.write(b"x")
            await asyncio.wait_for(reader.readexactly(1), 5.0)
            assert time.perf_counter() - started >= 0.080
            proxy.set_latency(0.0)
            proxy.set_bandwidth(None)
            with pytest.raises(ValueError):
                proxy.set_latency(-1.0)
            with pytest.raises(ValueError):
                proxy.set_bandwidth(0.0)
        finally:
            await close(writer)


async def test_grpc_health_check_through_the_proxy():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    health = await add_health(server)
    await server.start()
    await health.set_serving()
    try:
        async with LinkProxy("127.0.0.1", 0, "127.0.0.1", port, latency_ms=10.0) as proxy:
            target = proxy.address
            started = time.perf_counter()
            assert await check_health(target, 5.0) is True
            assert time.perf_counter() - started >= 0.020  # at least one round trip added

            proxy.stall()
            assert await check_health(target, 0.3) is False  # deadline exceeded, link held
            proxy.resume()
            assert await check_health(target, 5.0) is True

            async with grpc.aio.insecure_channel(target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                watch = stub.Watch(health_pb2.HealthCheckRequest())
                first = await asyncio.wait_for(watch.read(), 5.0)
                assert first.status == health_pb2.HealthCheckResponse.SERVING
                proxy.drop()
                with pytest.raises(grpc.aio.AioRpcError) as info:  # the open stream is cut
                    await asyncio.wait_for(watch.read(), 5.0)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE

                # The channel reconnects through the proxy; an RPC racing the reset may still
                # see UNAVAILABLE, which is what callers retry on.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 5.0
                while True:
                    try:
                        reply = await stub.Check(
                            health_pb2.HealthCheckRequest(), timeout=2.0, wait_for_ready=True
                        )
                        break
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
                        assert loop.time() < deadline, "no reconnect through the proxy"
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert proxy.stats.connections_total >= 2
    finally:
        await server.stop(None)


async def test_control_port_commands():
    async with proxied_echo() as (_echo, proxy):
        control = await ControlServer(proxy).start()
        try:
            assert await send_control_async("127.0.0.1", control.port, "latency 5") == (
                "latency_ms=5.0"
            )
            assert proxy.latency_ms == 5.0
            await send_control_async("127.0.0.1", control.port, "bandwidth 100")
            assert proxy.bandwidth_mbps == 100.0
            await send_control_async("127.0.0.1", control.port, "bandwidth off")
            assert proxy.bandwidth_mbps is None
            await send_control_async("127.0.0.1", control.port, "stall")
            assert proxy.stalled
            await send_control_async("127.0.0.1", control.port, "resume")
            assert not proxy.stalled
            stats = json.loads(await send_control_async("127.0.0.1", control.port, "stats"))
            assert stats["latency_ms"] == 5.0 and stats["open_connections"] == 0
            with pytest.raises(RuntimeError, match="unknown command"):
                await send_control_async("127.0.0.1", control.port, "explode")
            with pytest.raises(RuntimeError, match="latency_ms must be >= 0"):
                await send_control_async("127.0.0.1", control.port, "latency -3")
        finally:
            await control.close()


async def test_link_proxy_subcommand_in_its_own_process(tmp_path):
    async with EchoServer() as echo:
        proc = ServiceProcess(
            "link-proxy",
            [
                sys.executable,
                "-m",
                "services.cli.local",
                "link-proxy",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                f"127.0.0.1:{echo.port}",
                "--latency-ms",
                "20",
                "--control-port",
                "0",
            ],
            tmp_path,
        ).start()
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None,
                lambda: proc.wait_until(
                    lambda _l: proc.stdout_path.read_text().endswith("\n"), 20.0, "ready"
                ),
            )
            ready = json.loads(proc.stdout_path.read_text().splitlines()[0])
            host, port = ready["listen"].rsplit(":", 1)
            control_host, control_port = ready["control"].rsplit(":", 1)

            reader, writer = await asyncio.open_connection(host, int(port))
            started = time.perf_counter()
            writer.write(b"through")
            assert await asyncio.wait_for(reader.readexactly(7), 5.0) == b"through"
            assert time.perf_counter() - started >= 0.040

            reply = await loop.run_in_executor(
                None, send_control, control_host, int(control_port), "drop"
            )
            assert reply == "dropped 1"
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5.0) == b""
            await close(writer)
        finally:
            code = await loop.run_in_executor(None, proc.stop, 10.0)  # SIGTERM by pid
        assert code == 0, proc.log_tail()


async def test_epserve_pins_every_thread_of_a_process_to_the_cores_named(tmp_path):
    """EPSERVE_CPU_CORES (`epserve up --pin-cores`) applies before any thread starts, so every
    thread of the process carries the mask; a bad list is a one-line error, exit 2."""
    core = min(os.sched_getaffinity(0))
    async with EchoServer() as echo:
        proc = ServiceProcess.epserve(
            "pinned-proxy", ["link-proxy", "--listen", "127.0.0.1:0", "--upstream",
                             f"127.0.0.1:{echo.port}", "--control-port", "0"],
            tmp_path, env={CPU_CORES_ENV: str(core)}).start()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, lambda: proc.wait_until(
                lambda _l: proc.stdout_path.read_text().endswith("\n"), 20.0, "ready"))
            masks = {}
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                status = (task / "status").read_text()
                masks[task.name] = next(line.split(":", 1)[1].strip()
                                        for line in status.splitlines()
                                        if line.startswith("Cpus_allowed_list"))
            assert masks and set(masks.values()) == {str(core)}, masks
        finally:
            assert await loop.run_in_executor(None, proc.stop, 10.0) == 0, proc.log_tail()
    bad = await loop.run_in_executor(None, lambda: subprocess.run(
        epserve_argv("link-proxy", "--help"), env=child_env({CPU_CORES_ENV: "zero"}),
        capture_output=True, text=True, timeout=60))
    assert bad.returncode == 2 and "not a core list" in bad.stderr, bad.stderr
