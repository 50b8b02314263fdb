"""The ledger service: live metering of usage records and device occupancy (JetStream KV)."""
