"""Ledger settings (flags / EPSERVE_* variables, see services/common/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from services.common.service import ServiceConfig


@dataclass(frozen=True)
class LedgerConfig(ServiceConfig):
    model: str = field(default="-", metadata={"help": "unused (the ledger loads no model)"})
    instance_id: str = field(default="ledger", metadata={"help": "this ledger's member id"})
    prices: str = field(default="", metadata={
        "help": "price table (YAML/JSON; default: the one shipped, DeepSeek's with off-peak)"})
    price_as: str = field(default="deepseek-v3", metadata={
        "help": "bill a served model the price table does not list at this model's prices "
                "('' = refuse to bill it: its records are counted as unpriced)"})
    usd_per_device_hour: str = field(default="2", metadata={
        "help": "what one device (GPU) costs per hour (DeepSeek's day: $2 per H800-hour)"})
    gpus_per_node: int = field(default=8, metadata={"help": "devices per node in the report"})
    batch: int = field(default=256, metadata={"help": "usage records folded per write"})
    flush_interval_s: float = field(default=1.0, metadata={
        "help": "write device occupancy at least this often"})
    write_timeout_s: float = field(default=5.0, metadata={"help": "deadline of one KV write"})

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            price = Decimal(self.usd_per_device_hour)
        except InvalidOperation:
            price = Decimal("NaN")
        if not price.is_finite() or price < 0:
            raise ValueError(f"--usd-per-device-hour must be a number >= 0, "
                             f"got {self.usd_per_device_hour!r}")
        if self.gpus_per_node < 1 or self.batch < 1:
            raise ValueError("--gpus-per-node and --batch must be >= 1")
        if not self.flush_interval_s > 0 or not self.write_timeout_s > 0:
            raise ValueError("--flush-interval-s and --write-timeout-s must be > 0")

    @property
    def device_hour_usd(self) -> Decimal:
        return Decimal(self.usd_per_device_hour)
