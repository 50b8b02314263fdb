"""On-disk prefix cache of latent KV pages, DeepSeek-style: a prefill instance looks up the
longest cached prefix of a prompt and writes the pages it computed.

Pure cores: keys (page identity), page_file (the file format), index (residency and
prefix-closed LRU), planner (read or recompute). I/O: disk_store only (and fingerprint, which
reads the checkpoint once). Facade: cache.PrefixCache. This package's modules import torch
only where tensors are handled, so the disk store starts without it.
"""
