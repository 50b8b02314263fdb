"""Expert-worker processes on free loopback ports, stopped by pid (CLI and tests).

All workers start at once (loading overlaps) and then each is waited on until its gRPC
health check says SERVING. Workers sharing one machine's CPU run one torch thread each
(OMP_NUM_THREADS=1 unless `threads` says otherwise): N workers x all-cores thread pools
oversubscribe the cores and spin-wait (measured here: 55 ms per dispatch instead of 10).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from services.balance.placement import PlacementTable
from services.local.ports import free_port
from services.local.procs import ProcessGroup


class LocalExpertWorkers:
    def __init__(self, model_dir: str | Path, table: PlacementTable,
                 log_dir: str | Path | None = None, host: str = "127.0.0.1",
                 extra_args: tuple[str, ...] = (), threads: int = 1) -> None:
        self.model_dir, self.table, self.host = str(model_dir), table, host
        self._tmp = tempfile.TemporaryDirectory(prefix="epserve-workers-") if log_dir is None else None
        self.log_dir = Path(log_dir or self._tmp.name)
        self.extra_args = extra_args
        self.env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        self.group = ProcessGroup(self.log_dir)
        self.endpoints: list[str] = []

    def start(self, timeout: float = 180.0) -> list[str]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        placement = self.log_dir / f"placement-v{self.table.version}.json"
        placement.write_text(json.dumps(self.table.to_dict()))
        try:
            procs = []
            for rank in range(self.table.num_workers):
                port = free_port(self.host)
                self.endpoints.append(f"{self.host}:{port}")
                procs.append(self.group.start_epserve(f"expert-worker-{rank}", [
                    "serve", "expert-worker", "--model", self.model_dir, "--rank", str(rank),
                    "--placement", str(placement), "--host", self.host, "--port", str(port),
                    *self.extra_args], env=self.env))
            for proc, target in zip(procs, self.endpoints, strict=True):
                proc.wait_healthy(target, timeout)
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def pid(self, rank: int) -> int | None:
        return self.group[f"expert-worker-{rank}"].pid

    def stop(self) -> None:
        self.group.stop_all()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalExpertWorkers:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
