"""PlacementTable <-> epserve.v1.Topology (the control-plane message the scheduler stores).

The topology is the placement table plus the expert workers' endpoints, flattened for the
wire: phy2log is row-major over the MoE layers.
"""

from __future__ import annotations

from services.balance.placement import PlacementTable
from services.protos_gen.epserve.v1 import control_pb2


def topology_from(table: PlacementTable, endpoints: list[str]) -> control_pb2.Topology:
    return control_pb2.Topology(
        version=table.version, num_workers=table.num_workers,
        num_logical_experts=table.num_logical_experts, layer_ids=list(table.layer_ids),
        phy2log=[e for row in table.phy2log for e in row], worker_endpoints=endpoints)


def table_from(topo: control_pb2.Topology) -> PlacementTable:
    layers = list(topo.layer_ids)
    flat = list(topo.phy2log)
    if not layers or len(flat) % len(layers):
        raise ValueError("topology phy2log does not split into its layers")
    n = len(flat) // len(layers)
    return PlacementTable(topo.version, topo.num_workers, topo.num_logical_experts, tuple(layers),
                          tuple(tuple(flat[i * n:(i + 1) * n]) for i in range(len(layers))))
