"""API keys through the real cluster (router started with --api-keys): keys made and revoked
with `epserve keys`, refused without one (HTTP 401 / UNAUTHENTICATED), limited per key (429 /
RESOURCE_EXHAUSTED with Retry-After), and billed to the key's tenant by the ledger."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import openai
import pytest

from services.client import InferenceClient
from services.engine.sampling import SamplingParams
from services.local.cluster import ClusterSpec
from tests.integration.cluster_helpers import start, wait_for


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    c = start(ClusterSpec(model=str(tiny_model_dir), prefill=1, decode=1, expert_workers=2,
                          http_port=0, extra={"router": ("--api-keys",)}))
    yield c
    c.stop()


def epserve(cluster, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "services.cli", *args, "--nats-url",
                          cluster.nats_url, *cluster.operator_args()],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def create(cluster, tenant: str, *limits: str) -> dict:
    return json.loads(epserve(cluster, "keys", "create", "--tenant", tenant, "--json", *limits))


def api(cluster, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key=key, max_retries=0,
                         timeout=60)


def complete(cluster, key: str, max_tokens: int = 3):
    client = api(cluster, key)
    model = client.models.list().data[0].id  # a model list checks the key, not its limits
    return client.completions.create(model=model, prompt="to be or not to be",
                                     max_tokens=max_tokens)


def grpc_generate(cluster, key: str = "", request_id: str = ""):
    async def go():
        async with InferenceClient(cluster.router_endpoint, api_key=key) as client:
            return await client.generate(request_id, prompt="hello there",
                                         params=SamplingParams(max_tokens=3, ignore_eos=True))

    return asyncio.run(go())


def test_no_key_or_a_wrong_key_is_refused(cluster):
    for key in ("", "sk-not-ours", "ep-0123456789ab-" + "x" * 43):
        with pytest.raises(openai.AuthenticationError) as err:
            complete(cluster, key or "none")
        assert err.value.status_code == 401
        assert err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        api(cluster, "none").models.list()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        grpc_generate(cluster)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "invalid API key" in err.value.details()


def test_a_key_works_on_both_apis_and_bills_its_tenant(cluster):
    made = create(cluster, "acme", "--name", "tests")
    key = made["key"]
    r = complete(cluster, key)
    assert r.usage.completion_tokens == 3
    g = grpc_generate(cluster, key)
    assert len(g.token_ids) == 3
    assert api(cluster, key).models.list().data[0].id
    listed = json.loads(epserve(cluster, "keys", "list", "--json"))
    assert [k["tenant"] for k in listed if k["key_id"] == made["key_id"]] == ["acme"]
    assert key not in json.dumps(listed)
    want = r.usage.prompt_tokens + g.server_usage.prompt_tokens

    def billed() -> bool:
        out = subprocess.run([sys.executable, "-m", "services.cli", "economics", "live", "--json",
                              "--tenant", "acme", "--nats-url", cluster.nats_url,
                              *cluster.operator_args()],
                             capture_output=True, text=True, timeout=60)
        return out.returncode == 0 and json.loads(out.stdout)["tokens"]["input_total"] == want

    wait_for(billed, timeout=30, what="the ledger to bill tenant acme")


def test_a_revoked_key_stops_working(cluster):
    made = create(cluster, "acme")
    assert complete(cluster, made["key"]).usage.completion_tokens == 3
    epserve(cluster, "keys", "revoke", made["key_id"])

    def refused() -> bool:
        try:
            complete(cluster, made["key"])
        except openai.AuthenticationError:
            return True
        return False

    wait_for(refused, timeout=10, what="the revoked key to be refused")


def test_a_key_over_its_limit_gets_429_with_retry_after(cluster):
    key = create(cluster, "slowpoke", "--requests-per-s", "0.05")["key"]  # one per 20 s
    assert complete(cluster, key).usage.completion_tokens == 3
    with pytest.raises(openai.RateLimitError) as err:
        complete(cluster, key)
    assert err.value.status_code == 429
    assert int(err.value.response.headers["Retry-After"]) >= 1
    assert err.value.body["code"] == "rate_limit_exceeded"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        grpc_generate(cluster, key)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "requests per second" in err.value.details()
    retry = dict(err.value.trailing_metadata() or ()).get("retry-after")
    assert retry is not None and int(retry) >= 1
    # Another key of the same cluster is not held back by this one's limit.
    assert complete(cluster, create(cluster, "other")["key"]).usage.completion_tokens == 3


def test_a_key_cannot_reserve_more_kv_than_its_cap(cluster):
    key = create(cluster, "capped", "--max-reserved-tokens", "40")["key"]
    assert complete(cluster, key, max_tokens=3).usage.completion_tokens == 3
    with pytest.raises(openai.RateLimitError) as err:  # prompt + 60 alone is over 40
        complete(cluster, key, max_tokens=60)
    assert "reserved-token cap of 40" in err.value.body["message"]
    assert complete(cluster, key, max_tokens=3).usage.completion_tokens == 3  # given back


def test_a_batch_of_prompts_is_charged_as_a_request_per_choice(cluster):
    """Each (prompt, choice) of a batch is a request of its own to the key's limits: a key
    allowed one request per 20 s serves a batch of one prompt but refuses a batch of two."""
    limit = ("--requests-per-s", "0.05")
    one = api(cluster, create(cluster, "batcher", *limit)["key"])
    out = one.completions.create(model="", prompt=["to be"], max_tokens=3)
    assert out.usage.completion_tokens == 3
    two = api(cluster, create(cluster, "batcher", *limit)["key"])
    with pytest.raises(openai.RateLimitError) as err:
        two.completions.create(model="", prompt=["to be", "or not"], max_tokens=3)
    assert err.value.body["code"] == "rate_limit_exceeded"
    three = api(cluster, create(cluster, "batcher", *limit)["key"])
    with pytest.raises(openai.RateLimitError):
        three.completions.create(model="", prompt=[[10, 20]], n=2, max_tokens=3)
