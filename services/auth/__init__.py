"""API keys: their records (stored hashed in JetStream KV), per-key limits, the router's key ring."""
