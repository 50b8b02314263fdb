"""`epserve serve ledger`: the running cluster's own cost, revenue and margin, exactly once.

Folds the usage stream (services/ledger/folder.py) and every device holder's heartbeats into
token buckets and uptimes kept in JetStream KV (services/ledger/store.py), so a restarted ledger
continues from its cursor with nothing lost and nothing counted twice; exports the totals as
Prometheus gauges. One ledger per cluster. `epserve economics live` reads what it wrote.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import structlog

from services.common import subjects
from services.common.control import ensure_usage_stream
from services.common.service import Service
from services.economics.files import DEFAULT_PRICES, data_path, prices_from_text
from services.economics.tally import Tally
from services.ledger import metrics
from services.ledger.config import LedgerConfig
from services.ledger.folder import UsageFolder
from services.ledger.store import CURSOR_KEY, META_KEY, LedgerStore

log = structlog.get_logger("ledger")


class LedgerService(Service):
    role = "ledger"

    async def setup(self) -> None:
        cfg: LedgerConfig = self.cfg
        path = Path(cfg.prices) if cfg.prices else data_path(DEFAULT_PRICES)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SystemExit(f"ledger: cannot read price table {path}: {exc}") from None
        prices = prices_from_text(text, path.suffix, str(path))
        if cfg.price_as:
            prices.standard(cfg.price_as)  # fails now, naming the model, if it has no price
        js = self.nc.jetstream()
        await ensure_usage_stream(js)
        store = await LedgerStore.open(js, cfg.write_timeout_s)
        docs = await store.read_all()
        tally = Tally(prices, price_as=cfg.price_as)
        for key, doc in docs.items():
            tally.load(key, doc)
        cursor = int(docs.get(CURSOR_KEY, {}).get("seq", 0))
        # What `economics live` needs to price and cost the way this ledger does.
        await store.write(META_KEY, {
            "prices_text": text, "prices_suffix": path.suffix, "prices_source": str(path),
            "price_as": cfg.price_as, "usd_per_device_hour": cfg.usd_per_device_hour,
            "gpus_per_node": cfg.gpus_per_node})
        self.folder = UsageFolder(js, store, tally, cursor, batch=cfg.batch,
                                  usd_per_device_hour=cfg.device_hour_usd)
        metrics.publish(tally, cursor, cfg.device_hour_usd)
        log.info("ledger_recovered", buckets=len(tally.buckets), uptimes=len(tally.uptimes),
                 cursor=cursor, prices=str(path))
        self.sub = await self.nc.subscribe(subjects.HEARTBEAT_ALL, cb=self.folder.on_heartbeat)
        self.tasks = [asyncio.create_task(self.folder.run()),
                      asyncio.create_task(self.folder.flush_forever(cfg.flush_interval_s))]

    async def stop_core(self) -> None:
        for task in self.tasks:
            task.cancel()
        _, stuck = await asyncio.wait(self.tasks, timeout=5.0)
        if stuck:  # never expected: each loop's waits are bounded and end on cancellation
            log.warning("ledger_tasks_did_not_stop", tasks=len(stuck))
        await self.sub.unsubscribe()
        # the pull consumer's subscription too: left open, the NATS drain after this waits on
        # it past any grace (the process was SIGKILLed on every stop)
        await self.folder.close()
        try:  # the last occupancy credits (a bounded attempt: NATS may be gone)
            async with self.folder.lock:
                await asyncio.wait_for(self.folder.write_dirty(), self.cfg.write_timeout_s)
        except Exception as exc:
            log.warning("ledger_final_flush_failed", error=f"{type(exc).__name__}: {exc}")


async def serve(cfg: LedgerConfig) -> int:
    return await LedgerService(cfg).run()


if __name__ == "__main__":
    from services.common.settings import settings_from

    sys.exit(asyncio.run(serve(settings_from(LedgerConfig))))
