"""Prefill and decode request balancers: objectives, bookkeeping, eligibility, determinism."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.balance.decode_lb import DecodeBalancer, DecodeBalancerConfig, DecodeInstanceLoad
from services.balance.ledger import DispatchLedger, NoEligibleInstance
from services.balance.prefill_lb import PrefillBalancer, PrefillBalancerConfig, PrefillInstanceLoad
from services.common.states import InstanceState

# ---- prefill ------------------------------------------------------------------------------------


def test_prefill_prefers_the_instance_with_least_attention_and_tokens():
    instances = [
        PrefillInstanceLoad("a", queued_tokens=4000, attention_cost=16e6),
        PrefillInstanceLoad("b", queued_tokens=1000, attention_cost=1e6),
        PrefillInstanceLoad("c", queued_tokens=2000, attention_cost=4e6),
    ]
    assert PrefillBalancer().choose(instances, 500) == "b"


def test_prefill_balances_attention_not_just_tokens():
    # Same tokens, but "a" holds one 4000-token prompt (16e6) and "b" four 1000-token ones (4e6).
    instances = [
        PrefillInstanceLoad("a", queued_tokens=4000, attention_cost=16e6),
        PrefillInstanceLoad("b", queued_tokens=4000, attention_cost=4e6),
    ]
    assert PrefillBalancer().choose(instances, 1000) == "b"
    tokens_only = PrefillBalancer(PrefillBalancerConfig(attention_weight=0.0))
    assert tokens_only.choose(instances, 1000) == "a"  # tie on tokens -> lower id


def test_prefill_skips_draining_and_dead_and_raises_when_none_active():
    instances = [
        PrefillInstanceLoad("a", state=InstanceState.DRAINING),
        PrefillInstanceLoad("b", queued_tokens=10**6, attention_cost=1e12),
        PrefillInstanceLoad("c", state="dead"),
    ]
    assert PrefillBalancer().choose(instances, 10) == "b"
    with pytest.raises(NoEligibleInstance):
        PrefillBalancer().choose([instances[0], instances[2]], 10)
    with pytest.raises(ValueError, match="duplicate"):
        PrefillBalancer().choose([instances[1], instances[1]], 10)
    with pytest.raises(ValueError, match="prompt_len"):
        PrefillBalancer().choose(instances, 0)


def test_prefill_counts_what_it_sent_until_the_report_acknowledges_it():
    balancer = PrefillBalancer()
    idle = [PrefillInstanceLoad(i, acked_seq=0) for i in ("a", "b", "c")]
    # With stale (all idle) reports, equal prompts still spread instead of herding onto "a".
    chosen = []
    for n in range(6):
        target = balancer.choose(idle, 1000)
        balancer.on_dispatched(target, f"r{n}", 1000)
        chosen.append(target)
    assert chosen == ["a", "b", "c", "a", "b", "c"]
    assert balancer.estimated_loads(idle)["a"] == (2e6, 2000.0)
    # "a" reports it has both of its requests (seqs 1 and 4): no double counting.
    reported = PrefillInstanceLoad("a", queued_tokens=2000, attention_cost=2e6, acked_seq=4)
    assert balancer.estimated_loads([reported])["a"] == (2e6, 2000.0)
    assert balancer.unreported == 4
    balancer.on_finished("r1")  # b's first request finished before any report
    assert balancer.estimated_loads(idle)["b"] == (1e6, 1000.0)
    balancer.on_finished("unknown")  # idempotent


def test_prefill_without_acks_takes_the_larger_of_report_and_own_ledger():
    balancer = PrefillBalancer()
    balancer.on_dispatched("a", "r1", 100)
    lagging = PrefillInstanceLoad("a", queued_tokens=0, attention_cost=0.0)
    other_routers = PrefillInstanceLoad("a", queued_tokens=5000, attention_cost=9e6)
    assert balancer.estimated_loads([lagging])["a"] == (1e4, 100.0)
    assert balancer.estimated_loads([other_routers])["a"] == (9e6, 5000.0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 10**5), st.integers(0, 10**4), st.sampled_from(list(InstanceState))
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 32768),
)
def test_prefill_choice_minimises_the_worst_normalised_load(rows, prompt_len):
    instances = [
        PrefillInstanceLoad(
            f"i{n}", queued_tokens=tok, attention_cost=float(tok) * side, state=state
        )
        for n, (tok, side, state) in enumerate(rows)
    ]
    active = [i for i in instances if i.state is InstanceState.SERVING]
    if not active:
        with pytest.raises(NoEligibleInstance):
            PrefillBalancer().choose(instances, prompt_len)
        return
    chosen = PrefillBalancer().choose(instances, prompt_len)
    assert chosen == PrefillBalancer().choose(list(reversed(instances)), prompt_len)  # order-free
    cost = prompt_len**2
    fair_a = (sum(i.attention_cost for i in active) + cost) / len(active)
    fair_t = (sum(i.queued_tokens for i in active) + prompt_len) / len(active)

    def worst(i):
        return max((i.attention_cost + cost) / fair_a, (i.queued_tokens + prompt_len) / fair_t)

    by_id = {i.instance_id: i for i in active}
    assert worst(by_id[chosen]) <= min(worst(i) for i in active) + 1e-9


# ---- decode -------------------------------------------------------------------------------------


def decode(name, used, total=1000, running=0, **kw):
    return DecodeInstanceLoad(
        name, kv_blocks_in_use=used, kv_blocks_total=total, running_requests=running, **kw
    )


def test_prefill_prefers_the_instance_holding_the_prompts_prefix():
    lb = PrefillBalancer()
    idle = [PrefillInstanceLoad("a"), PrefillInstanceLoad("b")]
    assert lb.choose(idle, 1000) == "a"  # a tie: the id decides
    assert lb.choose(idle, 1000, cached={"b": 960}) == "b"
    assert lb.choose(idle, 1000, cached={"b": 5000}) == "b"  # capped at the prompt


def test_prefill_gives_up_a_cached_prefix_on_a_loaded_instance():
    loaded = [PrefillInstanceLoad("a"), PrefillInstanceLoad("b", queued_tokens=20_000,
                                                             attention_cost=4e8)]
    assert PrefillBalancer().choose(loaded, 1000, cached={"b": 960}) == "a"
    lightly = [PrefillInstanceLoad("a"), PrefillInstanceLoad("b", queued_tokens=200,
                                                              attention_cost=4e4)]
    assert PrefillBalancer().choose(lightly, 1000, cached={"b": 960}) == "b"


def test_decode_balances_kv_fraction_and_request_count():
    balancer = DecodeBalancer()
    # "b" uses fewer blocks in absolute terms but a larger fraction of its smaller cache.
    assert balancer.choose([decode("a", 400, 1000, 10), decode("b", 300, 500, 10)], 64) == "a"
    # Equal KV: fewer running requests wins.
    assert balancer.choose([decode("a", 100, running=20), decode("b", 100, running=5)], 64) == "b"


def test_decode_avoids_instances_where_the_request_does_not_fit():
    balancer = DecodeBalancer(DecodeBalancerConfig(block_tokens=64, output_reserve_tokens=0))
    # 6400 tokens = 100 blocks: "a" has 60 free blocks and no requests, "b" has 200 free.
    instances = [decode("a", 940, running=0), decode("b", 800, running=50)]
    assert balancer.choose(instances, 6400) == "b"
    # Nothing fits: the least-full fraction still gets it rather than failing.
    assert balancer.choose([decode("a", 990), decode("b", 995)], 6400) == "a"


def test_decode_reserves_capped_output_and_tracks_dispatches():
    config = DecodeBalancerConfig(block_tokens=64, output_reserve_tokens=128)
    assert config.blocks_for(64, 0) == 1
    assert config.blocks_for(64, 10_000) == 3
    balancer = DecodeBalancer(config)
    idle = [decode(i, 0, acked_seq=0) for i in ("a", "b")]
    seqs = []
    for n in range(4):
        target = balancer.choose(idle, 100, 10_000)
        seqs.append(balancer.on_dispatched(target, f"r{n}", 100, 10_000))
    assert seqs == [1, 2, 3, 4]
    assert balancer.estimated_loads(idle) == {"a": (8.0, 2.0), "b": (8.0, 2.0)}
    balancer.on_finished("r0")
    assert balancer.estimated_loads(idle)["a"] == (4.0, 1.0)


def test_decode_skips_inactive_and_validates():
    balancer = DecodeBalancer()
    instances = [decode("a", 0, state="draining"), decode("b", 999)]
    assert balancer.choose(instances, 10) == "b"
    with pytest.raises(NoEligibleInstance):
        balancer.choose([decode("a", 0, state=InstanceState.DEAD)], 10)
    with pytest.raises(ValueError, match="kv_blocks_total"):
        decode("a", 0, total=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        balancer.choose(instances, 10, -1)
    with pytest.raises(ValueError, match="block_tokens"):
        DecodeBalancerConfig(block_tokens=0)
    with pytest.raises(ValueError, match="must be positive"):
        DecodeBalancerConfig(kv_weight=0, request_weight=0)


def test_decode_spreads_equal_requests_round_robin_when_reports_are_stale():
    balancer = DecodeBalancer()
    instances = [decode(f"d{n}", 0, acked_seq=0) for n in range(3)]
    chosen = []
    for n in range(7):
        chosen.append(balancer.choose(instances, 500))
        balancer.on_dispatched(chosen[-1], f"r{n}", 500)
    assert chosen == ["d0", "d1", "d2", "d0", "d1", "d2", "d0"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2000), st.integers(1, 2000), st.integers(0, 100), st.booleans()),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 20000),
)
def test_decode_choice_minimises_the_worst_normalised_load(rows, prompt_len):
    instances = [
        decode(f"i{n}", used, total=total, running=running, state="serving" if up else "draining")
        for n, (used, total, running, up) in enumerate(rows)
    ]
    active = [i for i in instances if i.state is InstanceState.SERVING]
    if not active:
        with pytest.raises(NoEligibleInstance):
            DecodeBalancer().choose(instances, prompt_len)
        return
    balancer = DecodeBalancer()
    chosen = balancer.choose(instances, prompt_len)
    assert chosen == DecodeBalancer().choose(list(reversed(instances)), prompt_len)
    need = balancer.config.blocks_for(prompt_len, 0)
    fits = [i for i in active if i.kv_blocks_in_use + need <= i.kv_blocks_total]
    fair_kv = (sum(i.kv_blocks_in_use for i in active) + need) / sum(
        i.kv_blocks_total for i in active
    )
    fair_req = (sum(i.running_requests for i in active) + 1) / len(active)

    def worst(i):
        kv = (i.kv_blocks_in_use + need) / i.kv_blocks_total / fair_kv
        return max(kv, (i.running_requests + 1) / fair_req)

    by_id = {i.instance_id: i for i in active}
    assert (by_id[chosen] in fits) or not fits  # room first
    assert worst(by_id[chosen]) <= min(worst(i) for i in (fits or active)) + 1e-9


# ---- ledger -------------------------------------------------------------------------------------


def test_ledger_redispatch_replaces_and_ack_drops_in_order():
    ledger = DispatchLedger(dimensions=1)
    assert ledger.record("a", "r1", (1.0,)) == 1
    assert ledger.record("a", "r2", (2.0,)) == 2
    assert ledger.record("b", "r1", (4.0,)) == 3  # r1 re-driven to b
    assert ledger.outstanding("a") == (2.0,)
    assert ledger.outstanding("b") == (4.0,)
    ledger.acknowledge("a", 2)
    assert ledger.outstanding("a") == (0.0,)
    assert len(ledger) == 1
    with pytest.raises(ValueError, match="expected 1"):
        ledger.record("a", "r3", (1.0, 2.0))
