"""`epserve generate`: JSON output and one-line errors (run as a real subprocess)."""

import json
import subprocess
import sys

import pytest


def epserve(*args):
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_json_output(tiny_model_dir):
    r = epserve("generate", "--model", str(tiny_model_dir), "--prompt", "Hello world",
                "--max-tokens", "6", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert len(out["token_ids"]) == 6 and isinstance(out["text"], str)
    assert out["finish_reason"] == "length" and out["completion_tokens"] == 6


def test_prompt_ids_batch(tiny_model_dir):
    r = epserve("generate", "--model", str(tiny_model_dir), "--prompt-ids", "3,4,5",
                "--prompt-ids", "6,7", "--max-tokens", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["prompt_ids"] for x in r.stdout.splitlines()] == [[3, 4, 5], [6, 7]]


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model", "--prompt-ids", "1"], "does not exist"),
    (["--prompt-ids", "1,2,99999"], "outside vocab"),
    (["--prompt-ids", "1,x"], "comma-separated"),
    (["--prompt-ids", "1", "--max-tokens", "0"], "max_tokens"),
    (["--prompt-ids", "1", "--top-p", "0"], "top_p"),
])
def test_errors_are_one_line(tiny_model_dir, args, message):
    if "--model" not in args:
        args = ["--model", str(tiny_model_dir), *args]
    r = epserve("generate", *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_malformed_config_is_one_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{ nope")
    r = epserve("generate", "--model", str(bad), "--prompt-ids", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "not valid JSON" in r.stderr


def test_request_ids_are_unique_per_run_unless_given():
    from services.cli.generate import request_ids
    from services.client import unique_prefix

    one, two = unique_prefix("cli"), unique_prefix("cli")
    assert one != two and one.startswith("cli-")
    a, b = request_ids([], 3, one), request_ids([], 3, two)
    assert len(set(a)) == 3 and not set(a) & set(b)  # two runs at once share no id
    assert request_ids(["x", "y"], 2, one) == ["x", "y"]


@pytest.mark.parametrize("given", [["x"], ["x", "x"], ["x", "y", "z"]])
def test_given_request_ids_must_be_one_distinct_per_prompt(given):
    from services.cli.generate import request_ids
    from services.common.errors import CliError

    with pytest.raises(CliError, match="one distinct --request-id per prompt"):
        request_ids(given, 2, "cli-p")


def test_request_id_without_endpoint_is_refused(tiny_model_dir):
    r = epserve("generate", "--model", str(tiny_model_dir), "--prompt-ids", "1",
                "--request-id", "mine")
    assert r.returncode != 0 and "needs --endpoint" in r.stderr


async def test_client_ids_are_unique_per_client_and_kept_when_given():
    from services.client import InferenceClient

    async with InferenceClient("127.0.0.1:1") as a, InferenceClient("127.0.0.1:1") as b:
        ids_a = {a.new_request_id() for _ in range(3)}
        assert len(ids_a) == 3 and not ids_a & {b.new_request_id() for _ in range(3)}
    async with InferenceClient("127.0.0.1:1", id_prefix="mine") as c:
        assert c.new_request_id() == "mine-0"
