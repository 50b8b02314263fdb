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


# JetStream KV buckets.
MEMBERS_BUCKET = "epserve_members"  # key: instance id -> Member
TOPOLOGY_BUCKET = "epserve_topology"  # key TOPOLOGY_KEY -> Topology
TOPOLOGY_KEY = "current"
PLAN_BUCKET = "epserve_plan"  # key PLAN_KEY -> OverlapPlan
PLAN_KEY = "current"

# JetStream streams (durable, de-duplicated by Nats-Msg-Id).
USAGE_STREAM = "EPSERVE_USAGE"
USAGE_SUBJECT = f"{PREFIX}.usage"

ROLE_NAMES = {1: "router", 2: "scheduler", 3: "prefill", 4: "decode", 5: "expert-worker"}

STATE_NAMES = {1: "starting", 2: "serving", 3: "draining", 4: "dead"}  # control.InstanceState
