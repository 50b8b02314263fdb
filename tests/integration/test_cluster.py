"""The disaggregated cluster, every service a real process, over gRPC and NATS (tiny model,
1 prefill, 1 decode, 2 expert workers with 2 redundant slots).

Master invariant through the public API, seeded sampling, bad inputs, admission control,
cancellation, usage records, Tokenize/ListModels, scheduler restart, SIGTERM drain.
The destructive tests run last (pytest keeps file order).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import urllib.error
import urllib.request

import grpc
import nats
import pytest

from services.client import InferenceClient
from services.common import subjects
from services.common.control import kv_get
from services.common.health import check_health
from services.common.metrics_http import scrape_metrics
from services.engine.sampling import SamplingParams
from services.engine.sampling_proto import params_to_proto
from services.local.cluster import ClusterSpec
from services.local.ports import free_port
from services.local.procs import ServiceProcess
from services.model.config import ModelConfig
from services.model.tokenizer import Tokenizer
from services.protos_gen.epserve.v1 import control_pb2, inference_pb2
from tests.integration.cluster_helpers import (
    check_invariant,
    decode_metrics,
    reference,
    run_remote,
    start,
    wait_for,
    workload,
)

# The decode instance's KV cache: 6 blocks of 64 tokens, less than one 512-token context, so
# the tests below can fill it: requests wait for room, and one that can never fit is refused.
KV_BLOCKS = 6


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    c = start(ClusterSpec(model=str(tiny_model_dir), prefill=1, decode=1, expert_workers=2,
                          redundant_experts=2, max_inflight=16, http_port=0,
                          kv_blocks=KV_BLOCKS))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def workload_and_reference(tiny_model_dir):
    reqs = workload(ModelConfig.from_dir(tiny_model_dir).vocab_size)
    return reqs, reference(tiny_model_dir, reqs)


def test_master_invariant_through_the_router(cluster, workload_and_reference, tiny_model_dir):
    reqs, expected = workload_and_reference
    got = asyncio.run(run_remote(cluster.router_endpoint, reqs))
    check_invariant(reqs, expected, got)
    tok = Tokenizer.from_dir(tiny_model_dir)
    for c in got:  # streamed text deltas + final text == decoding all the ids at once
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.server_usage.completion_tokens == len(c.token_ids)
        assert c.server_usage.time_to_first_token_s > 0


def test_seeded_sampling_is_reproducible(cluster):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)

    async def go():
        async with InferenceClient(cluster.router_endpoint) as client:
            a = await client.generate("seed-a", prompt="hello there", params=params)
            b = await client.generate("seed-b", prompt="hello there", params=params)
            other = SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True)
            c = await client.generate("seed-c", prompt="hello there", params=other)
        return a, b, c

    a, b, c = asyncio.run(go())
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def _bad(**changes) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(request_id="bad", prompt="hi",
                                        sampling=inference_pb2.SamplingParams(max_tokens=4))
    for key, value in changes.items():
        if key in ("max_tokens", "temperature", "top_p"):
            setattr(req.sampling, key, value)
        elif key == "prompt_ids":
            req.ClearField("prompt")
            req.prompt_ids.extend(value)
        else:
            setattr(req, key, value)
    return req


BAD_INPUTS = [
    (dict(prompt=""), "empty prompt"),
    (dict(prompt_ids=[5] * 600), "more than the model's context"),
    (dict(max_tokens=0), "max_tokens must be > 0"),
    (dict(max_tokens=600), "exceeds the model's context"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(model="gpt-5"), "unknown model"),
    (dict(prompt_ids=[1, 10**6]), "outside the vocabulary"),
    (dict(request_id="has space"), "request_id must be"),
]


def test_bad_inputs_get_invalid_argument_and_the_router_stays_healthy(cluster):
    async def go():
        async with InferenceClient(cluster.router_endpoint) as client:
            for changes, fragment in BAD_INPUTS:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in client.stream(_bad(**changes), timeout=30):
                        pass
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, changes
                assert fragment in err.value.details(), (changes, err.value.details())
            ok = await client.generate("after-bad", prompt="hi",
                                       params=SamplingParams(max_tokens=3))
            return ok, await check_health(cluster.router_endpoint, 5)

    ok, healthy = asyncio.run(go())
    assert len(ok.token_ids) >= 1 and healthy


def test_tokenize_and_list_models(cluster, tiny_model_dir):
    async def go():
        async with InferenceClient(cluster.router_endpoint) as client:
            return await client.tokenize("hello world"), await client.list_models()

    ids, models = asyncio.run(go())
    assert ids == Tokenizer.from_dir(tiny_model_dir).encode("hello world")
    cfg = ModelConfig.from_dir(tiny_model_dir)
    assert models[0].context_length == cfg.max_position_embeddings
    assert models[0].routed_experts == cfg.n_routed_experts


def _http(cluster, path: str, body: dict | bytes | None = None) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(cluster.http_url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_openai_http_api_matches_grpc_and_the_reference(cluster, workload_and_reference,
                                                        tiny_model_dir):
    reqs, expected = workload_and_reference
    tok = Tokenizer.from_dir(tiny_model_dir)
    status, body = _http(cluster, "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["max_model_len"] == 512
    r, want = reqs[0], expected[0]  # a greedy request of the invariant workload
    completion = {"prompt": r.prompt_ids, "max_tokens": r.params.max_tokens, "temperature": 0,
                  "ignore_eos": True}
    status, body = _http(cluster, "/v1/completions", completion)
    assert status == 200, body
    out = json.loads(body)
    assert out["choices"][0]["text"] == tok.decode(want.token_ids, skip_special_tokens=True)
    assert out["choices"][0]["finish_reason"] == "length"
    # OpenAI's usage, with the prompt tokens a prefix cache served (none, or some of these)
    cached = out["usage"].pop("prompt_tokens_details")["cached_tokens"]
    assert 0 <= cached <= len(r.prompt_ids)
    # ... and DeepSeek's own fields for the same split
    assert (out["usage"].pop("prompt_cache_hit_tokens"),
            out["usage"].pop("prompt_cache_miss_tokens")) == (cached, len(r.prompt_ids) - cached)
    assert out["usage"] == {"prompt_tokens": len(r.prompt_ids),
                            "completion_tokens": r.params.max_tokens,
                            "total_tokens": len(r.prompt_ids) + r.params.max_tokens}
    # Streaming chat: the deltas add up to the non-streamed answer; the stream ends with [DONE].
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 10,
            "temperature": 0, "ignore_eos": True}
    status, whole = _http(cluster, "/v1/chat/completions", chat)
    assert status == 200, whole
    status, streamed = _http(cluster, "/v1/chat/completions", {**chat, "stream": True})
    events = [line[6:] for line in streamed.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == json.loads(whole)["choices"][0]["message"]["content"]


def test_openai_http_client_going_away_frees_the_decode_slot(cluster):
    cancelled = 'epserve_decode_requests_total{outcome="cancelled"}'
    before = decode_metrics(cluster).get(cancelled, 0)
    host, port = cluster.http_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "go away", "max_tokens": 300, "ignore_eos": True, "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read(60).startswith(b"data: ")  # streaming has begun
    conn.close()
    wait_for(lambda: decode_metrics(cluster)["epserve_decode_running_requests"] == 0,
              what="the decode slot to be freed after the HTTP client left")
    assert decode_metrics(cluster)[cancelled] == before + 1  # cut short, not run to the end


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens must be > 0"),
    ({"prompt": "hi", "stop": [""]}, "stop strings must be 1..256 characters"),
    ({"prompt": "hi", "max_tokens": 4, "top_p": 2}, "top_p must be in (0, 1]"),
    ({"prompt": 5}, "prompt must be a string, a list of token ids"),
])
def test_openai_http_errors_are_400_json(cluster, body, fragment):
    status, raw = _http(cluster, "/v1/completions", body)
    assert status == 400
    assert fragment in json.loads(raw)["error"]["message"]


def test_cancellation_frees_the_decode_slot(cluster):
    async def go():
        async with InferenceClient(cluster.router_endpoint) as client:
            req = inference_pb2.GenerateRequest(
                request_id="to-cancel", prompt="a long one",
                sampling=params_to_proto(SamplingParams(max_tokens=300, ignore_eos=True)))
            call = client.stream(req, timeout=60)
            seen = 0
            async for resp in call:
                seen += resp.WhichOneof("kind") == "delta"
                if seen == 2:
                    break
            assert decode_metrics(cluster)["epserve_decode_running_requests"] == 1
            call.cancel()

    asyncio.run(go())
    wait_for(lambda: decode_metrics(cluster)["epserve_decode_running_requests"] == 0,
              what="the decode slot to be freed")
    m = decode_metrics(cluster)
    assert m["epserve_decode_kv_blocks_reserved"] == 0
    assert m['epserve_decode_requests_total{outcome="cancelled"}'] >= 1


def test_admission_control_refuses_beyond_the_bound(cluster, tiny_model_dir, tmp_path):
    """A second router on the same cluster, bounded at 2 requests in flight."""
    port = free_port()
    router = ServiceProcess.epserve("router-bounded", [
        "serve", "router", "--model", str(tiny_model_dir), "--nats-url", cluster.nats_url,
        "--port", str(port), "--max-inflight", "2", "--instance-id", "router-bounded",
        *cluster.extra_identity_args("router-bounded", "router")], tmp_path)
    router.start()
    try:
        router.wait_healthy(f"127.0.0.1:{port}", 60)

        async def go():
            async with InferenceClient(f"127.0.0.1:{port}") as client:
                long = SamplingParams(max_tokens=100, ignore_eos=True)  # 2 blocks each
                calls = []
                for i in range(2):
                    call = client.stream(inference_pb2.GenerateRequest(
                        request_id=f"hold-{i}", prompt="x", sampling=params_to_proto(long)))
                    await call.read()  # admitted and streaming
                    calls.append(call)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.generate("third", prompt="x", params=SamplingParams(max_tokens=2))
                for call in calls:
                    call.cancel()
                await asyncio.sleep(0.5)
                after = await client.generate("fourth", prompt="x",
                                              params=SamplingParams(max_tokens=2))
                return err.value, after

        err, after = asyncio.run(go())
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at capacity" in err.details()
        assert len(after.token_ids) == 2
    finally:
        assert router.stop() == 0


def test_decode_kv_budget_waits_for_room_and_refuses_what_never_fits(cluster):
    async def go():
        async with InferenceClient(cluster.router_endpoint) as client:
            # 3 blocks each (10 + 170 tokens): two fit at once, the third waits for room.
            big = SamplingParams(max_tokens=170, ignore_eos=True)
            done = await asyncio.gather(*(
                client.generate(f"kv-{i}", prompt_ids=[5 + i] * 10, params=big)
                for i in range(3)))
            with pytest.raises(grpc.aio.AioRpcError) as err:  # 8 blocks > the 6 there are
                await client.generate("kv-huge", prompt_ids=[5] * 10,
                                      params=SamplingParams(max_tokens=450, ignore_eos=True))
            return done, err.value

    done, err = asyncio.run(go())
    assert [len(c.token_ids) for c in done] == [170] * 3
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"needs 8 KV blocks; this instance has {KV_BLOCKS}" in err.details()
    m = decode_metrics(cluster)
    assert m["epserve_decode_kv_blocks_reserved"] == 0


def test_one_usage_record_per_request(cluster, workload_and_reference):
    reqs, _ = workload_and_reference

    async def go():
        nc = await nats.connect(cluster.nats_url, **cluster.nats_options())
        js = nc.jetstream()
        sub = await js.subscribe(subjects.USAGE_SUBJECT, ordered_consumer=True)
        records = {}
        try:
            while True:
                msg = await sub.next_msg(timeout=2)
                rec = control_pb2.UsageRecord()
                rec.ParseFromString(msg.data)
                assert rec.request_id not in records, f"duplicate record {rec.request_id}"
                records[rec.request_id] = rec
        except (TimeoutError, nats.errors.TimeoutError):
            pass
        await nc.close()
        return records

    records = asyncio.run(go())
    for r in reqs:
        rec = records[r.request_id]
        assert rec.completion_tokens == r.params.max_tokens
        assert rec.prompt_tokens == len(r.prompt_ids)
        assert rec.finish_reason == "length"
        assert rec.prefill_instance == "prefill-0" and rec.decode_instance == "decode-0"
    assert records["to-cancel"].finish_reason == "abort"


def test_scheduler_restart_changes_no_output(cluster, workload_and_reference):
    """The restarted scheduler recovers its state from NATS: a plan written to the bucket
    before the restart (one the flags would never seed) is what it reports afterwards."""
    reqs, expected = workload_and_reference
    marker = control_pb2.OverlapPlan(version=7, micro_batches=1,
                                     split_policy="balanced_attention", min_batch_tokens=16)

    async def buckets(new_plan=None):
        nc = await nats.connect(cluster.nats_url, **cluster.nats_options())
        js = nc.jetstream()
        topo = await kv_get(await js.key_value(subjects.TOPOLOGY_BUCKET), subjects.TOPOLOGY_KEY,
                            control_pb2.Topology)
        plan_kv = await js.key_value(subjects.PLAN_BUCKET)
        if new_plan is not None:
            await plan_kv.put(subjects.PLAN_KEY, new_plan.SerializeToString())
        plan = await kv_get(plan_kv, subjects.PLAN_KEY, control_pb2.OverlapPlan)
        await nc.close()
        return topo, plan

    before, _ = asyncio.run(buckets(marker))
    scheduler = cluster.process("scheduler")

    async def during_restart():
        run = asyncio.create_task(run_remote(cluster.router_endpoint, reqs, "-restart"))
        await asyncio.sleep(0.2)
        assert await asyncio.to_thread(scheduler.stop) == 0
        await asyncio.to_thread(scheduler.start)
        await asyncio.to_thread(scheduler.wait_healthy, cluster.endpoints["scheduler"], 60)
        return await run

    got = asyncio.run(during_restart())
    check_invariant(reqs, expected, got)
    after, plan = asyncio.run(buckets())
    assert after == before and plan == marker  # recovered from NATS, not re-planned or seeded
    seen = scrape_metrics(cluster.metrics_urls["scheduler"])
    assert seen["epserve_scheduler_plan_version"] == 7  # what the new process read back
    assert seen["epserve_scheduler_topology_version"] == before.version
    got_again = asyncio.run(run_remote(cluster.router_endpoint, reqs, "-after"))
    check_invariant(reqs, expected, got_again)


def test_sigterm_drains_the_decode_instance(cluster):
    """In-flight requests finish; the instance exits 0. (Destructive: last in the module.)"""
    decode = cluster.process("decode-0")

    async def go():
        async with InferenceClient(cluster.router_endpoint) as client:
            run = asyncio.create_task(client.generate(
                "drained", prompt="drain me", params=SamplingParams(max_tokens=40,
                                                                   ignore_eos=True)))
            while decode_metrics(cluster).get("epserve_decode_running_requests", 0) < 1:
                await asyncio.sleep(0.05)
            decode.send_signal(signal.SIGTERM)
            return await run

    done = asyncio.run(go())
    assert len(done.token_ids) == 40 and done.finish_reason == "length"
    wait_for(lambda: not decode.is_running(), 30, "decode to exit")
    assert decode.returncode == 0

    async def member_state():
        nc = await nats.connect(cluster.nats_url, **cluster.nats_options())
        kv = await nc.jetstream().key_value(subjects.MEMBERS_BUCKET)
        member = await kv_get(kv, "decode-0", control_pb2.Member)
        await nc.close()
        return member.state

    # Silent for more than 3 heartbeat intervals: the scheduler marks it DEAD in the KV bucket.
    wait_for(lambda: asyncio.run(member_state()) == control_pb2.STATE_DEAD, 15,
              "the scheduler to mark decode-0 dead")
