"""ServiceProcess / ProcessGroup with real child processes (python -c), stopped by pid."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from services.local.ports import free_port
from services.local.procs import ProcessGroup, ServiceProcess, ServiceStartError
from tests.pids import pid_alive

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
IGNORES_TERM = [
    sys.executable,
    "-c",
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)",
]
# A minimal service: grpc.aio health SERVING after a short warm-up, drains on SIGTERM.
HEALTH_SERVER = textwrap.dedent(
    """
    import asyncio, sys, grpc
    from services.common.health import add_health
    from services.common.shutdown import StopEvent, drain, install_signal_handlers

    async def main():
        server = grpc.aio.server()
        server.add_insecure_port("127.0.0.1:" + sys.argv[1])
        health = await add_health(server)
        await server.start()
        stop = StopEvent()
        async def on_stop():
            await drain(health=health, server=server, server_grace_s=1.0)
            stop.set("signal")
        install_signal_handlers(asyncio.get_running_loop(), on_stop)
        await asyncio.sleep(0.3)  # stands in for loading weights
        await health.set_serving()
        await stop.wait()
        print("drained", flush=True)

    asyncio.run(main())
    """
)


def test_stop_sends_sigterm_and_reaps(tmp_path):
    proc = ServiceProcess("sleeper", SLEEPER, tmp_path).start()
    try:
        proc.wait_until(lambda _left: "up" in proc.stdout_path.read_text(), 5.0, "up")
        assert proc.is_running()
    finally:
        code = proc.stop(grace=5.0)
    assert code == -signal.SIGTERM
    assert proc.returncode == -signal.SIGTERM
    assert not pid_alive(proc.pid)
    assert proc.stop() == -signal.SIGTERM  # twice is fine


def test_stop_escalates_to_sigkill_after_grace(tmp_path):
    proc = ServiceProcess("stubborn", IGNORES_TERM, tmp_path).start()
    try:
        proc.wait_until(lambda _left: "ready" in proc.stdout_path.read_text(), 5.0, "ready")
        started = time.monotonic()
        code = proc.stop(grace=0.3)
    finally:
        proc.stop(grace=0.0)
    assert code == -signal.SIGKILL
    assert time.monotonic() - started < 5.0


def test_early_exit_raises_with_log_tail(tmp_path):
    argv = [
        sys.executable,
        "-c",
        "import sys; sys.stderr.write('boom: bad config\\n'); sys.exit(3)",
    ]
    proc = ServiceProcess("broken", argv, tmp_path).start()
    try:
        with pytest.raises(ServiceStartError, match="exited with code 3") as info:
            proc.wait_healthy(f"127.0.0.1:{free_port()}", timeout=10.0)
        assert "boom: bad config" in str(info.value)
    finally:
        proc.stop()


def test_wait_healthy_then_sigterm_drains(tmp_path):
    port = free_port()
    proc = ServiceProcess("health", [sys.executable, "-c", HEALTH_SERVER, str(port)], tmp_path)
    proc.start()
    try:
        proc.wait_healthy(f"127.0.0.1:{port}", timeout=20.0)
    finally:
        code = proc.stop(grace=10.0)
    assert code == 0, proc.log_tail()
    assert "drained" in proc.stdout_path.read_text()


async def test_wait_healthy_async(tmp_path):
    port = free_port()
    proc = ServiceProcess(
        "health-async", [sys.executable, "-c", HEALTH_SERVER, str(port)], tmp_path
    )
    proc.start()
    try:
        await proc.wait_healthy_async(f"127.0.0.1:{port}", timeout=20.0)
    finally:
        assert proc.stop(grace=10.0) == 0, proc.log_tail()


def test_wait_healthy_times_out_with_log_tail(tmp_path):
    proc = ServiceProcess("silent", SLEEPER, tmp_path).start()
    try:
        with pytest.raises(ServiceStartError, match="not SERVING"):
            proc.wait_healthy(f"127.0.0.1:{free_port()}", timeout=0.5)
    finally:
        proc.stop()


def test_group_stops_in_reverse_order_and_tolerates_dead_children(tmp_path):
    group = ProcessGroup(tmp_path)
    order_file = tmp_path / "order.txt"
    record_term = (
        "import signal, sys, time\n"
        "def on_term(*_):\n"
        f"    open({str(order_file)!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    with group:
        for name in ("first", "second", "third"):
            group.start(ServiceProcess(name, [sys.executable, "-c", record_term, name], tmp_path))
        for proc in group:
            proc.wait_until(lambda _l, p=proc: "ready" in p.stdout_path.read_text(), 10.0, "ready")
        group["second"].kill()
        codes = group.stop_all(grace=5.0)
    assert codes == {"third": 0, "second": -signal.SIGKILL, "first": 0}
    assert order_file.read_text().split() == ["third", "first"]
    assert all(not pid_alive(p.pid) for p in group)


def test_children_are_stopped_when_the_parent_exits_normally(tmp_path):
    parent_code = textwrap.dedent(
        f"""
        import sys
        from services.local.procs import ServiceProcess
        child = ServiceProcess("orphan", {SLEEPER!r}, {str(tmp_path)!r}).start()
        print(child.pid, flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", parent_code], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    child_pid = int(result.stdout.split()[0])
    assert not pid_alive(child_pid)
