"""Every NATS subject, JetStream stream and KV bucket name epserve uses, in one place."""

from __future__ import annotations

PREFIX = "epserve"

# Core subjects (fire-and-forget).
HEARTBEAT_ALL = f"{PREFIX}.heartbeat.>"
EXPERT_LOAD_ALL = f"{PREFIX}.expert_load.>"


def heartbeat(role: str, instance_id: str) -> str:
    return f"{PREFIX}.heartbeat.{role}.{instance_id}"


def expert_load(rank: int) -> str:
    return f"{PREFIX}.expert_load.{rank}"


# What each prefill instance's prefix-cache memory tier holds (cache-aware routing).
PREFIX_CACHE_ALL = f"{PREFIX}.prefix_cache.>"


def prefix_cache(instance_id: str) -> str:
    return f"{PREFIX}.prefix_cache.{instance_id}"


# JetStream KV buckets.
MEMBERS_BUCKET = "epserve_members"  # key: instance id -> Member
TOPOLOGY_BUCKET = "epserve_topology"  # key TOPOLOGY_KEY -> Topology
TOPOLOGY_KEY = "current"
PLAN_BUCKET = "epserve_plan"  # key PLAN_KEY -> OverlapPlan
PLAN_KEY = "current"

# JetStream streams (durable, de-duplicated by Nats-Msg-Id).
USAGE_STREAM = "EPSERVE_USAGE"
USAGE_SUBJECT = f"{PREFIX}.usage"

# The ledger's running totals (services/ledger): token buckets, device uptime, its cursor.
LEDGER_BUCKET = "epserve_ledger"
LEDGER_CONSUMER = "epserve-ledger"  # the durable consumer of USAGE_STREAM

# API keys (services/auth): key id -> ApiKeyRecord JSON (the key itself only hashed).
API_KEYS_BUCKET = "epserve_api_keys"
