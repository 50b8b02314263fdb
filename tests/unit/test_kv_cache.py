import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine.kv_cache import BlockAllocator, CacheFull, LatentKVCache, SeqChunk


def test_grow_and_free_accounting():
    a = BlockAllocator(num_blocks=4, block_size=4)
    a.grow("x", 5)  # 2 blocks
    assert a.used_blocks == 2 and a.free_blocks == 2
    assert a.slots("x", 0, 5) == [0, 1, 2, 3, 4]
    a.grow("y", 8)
    assert a.free_blocks == 0
    with pytest.raises(CacheFull):
        a.grow("z", 1)
    assert not a.has("z"), "a failed first grow leaves no table behind"
    a.free("x")
    assert a.free_blocks == 2
    a.grow("z", 1)
    assert a.can_grow("z", 4) and not a.can_grow("z", 9)


def test_slots_beyond_table_rejected():
    a = BlockAllocator(2, 4)
    a.grow("x", 3)
    with pytest.raises(ValueError):
        a.slots("x", 0, 5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcde"), st.integers(0, 40), st.booleans()), max_size=40))
def test_blocks_never_shared_or_lost(ops):
    a = BlockAllocator(num_blocks=12, block_size=4)
    for seq, n, free in ops:
        if free:
            a.free(seq)
            continue
        try:
            a.grow(seq, n)
        except CacheFull:
            pass
        owned = [s for q in "abcde" if a.has(q) for s in a._tables[q]]
        assert len(owned) == len(set(owned)), "a block belongs to two sequences"
        assert len(owned) + a.free_blocks == a.num_blocks, "a block was lost"


def test_latent_cache_batch_and_round_trip():
    cache = LatentKVCache(num_layers=2, latent_dim=3, num_blocks=5, block_size=2)
    batch = cache.batch([SeqChunk("a", 0, 3), SeqChunk("b", 0, 1)])
    assert batch.query_lens == (3, 1)
    assert batch.positions.tolist() == [0, 1, 2, 0]
    assert [s.numel() for s in batch.context_slots] == [3, 1]
    latent = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)
    cache.write("c", latent)
    assert torch.equal(cache.read("c", 3), latent)
    cache.free("c")
    assert not cache.allocator.has("c")
