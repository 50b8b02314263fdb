"""How many KV blocks a request reserves on a decode instance (pure): the one formula the
decode instance admits by and the router's decode balancer estimates with.

A request reserves, at admission, the blocks its whole life can need: prompt + max_tokens
tokens, capped by the model's context, rounded up to whole blocks (at least one).
"""

from __future__ import annotations


def kv_blocks_needed(prompt_tokens: int, max_tokens: int, block_tokens: int,
                     context_tokens: int | None = None) -> int:
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    tokens = prompt_tokens + max_tokens
    if context_tokens is not None:
        tokens = min(tokens, context_tokens)
    return max(1, -(-tokens // block_tokens))
