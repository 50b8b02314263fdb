"""The conformance tests' validators of OpenAI's OpenAPI document (tests/openai_schema.py)."""

from __future__ import annotations

import json

from tests import openai_schema
from tests.openai_schema import errors, nullable_as_null


def _example(name: str) -> dict:
    doc = json.loads(openai_schema.document_path().read_text(encoding="utf-8"))
    return json.loads(doc["components"]["schemas"][name]["x-oaiMeta"]["example"])


def test_the_documents_own_examples_conform():
    assert errors("CreateCompletionResponse", _example("CreateCompletionResponse")) == []
    assert errors("Model", _example("Model")) == []


def test_error_response_needs_param_and_code_which_may_be_null():
    ok = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    assert errors("ErrorResponse", ok) == []
    missing = {"error": {"message": "m", "type": "invalid_request_error", "code": "x"}}
    assert any("'param' is a required property" in e for e in errors("ErrorResponse", missing))


def test_nullable_is_read_as_or_null():
    schema = {"type": "object", "properties": {"f": {"type": "string", "nullable": True}}}
    assert nullable_as_null(schema) == {"type": "object", "properties": {
        "f": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
             "usage": None}
    assert errors("CreateChatCompletionStreamResponse", chunk) == []
    chunk["choices"][0]["finish_reason"] = "abort"  # not one of OpenAI's reasons
    assert errors("CreateChatCompletionStreamResponse", chunk) != []


def test_a_relaxed_schema_keeps_its_references():
    def finish_reason_nullable(schema: dict) -> None:
        items = schema["properties"]["choices"]["items"]
        items["properties"]["finish_reason"] = {"anyOf": [
            items["properties"]["finish_reason"], {"type": "null"}]}

    chunk = {**_example("CreateCompletionResponse")}
    chunk["choices"] = [{**chunk["choices"][0], "finish_reason": None}]
    assert errors("CreateCompletionResponse", chunk) != []
    assert errors("CreateCompletionResponse", chunk, finish_reason_nullable) == []
    chunk["usage"] = {"prompt_tokens": "five"}  # CompletionUsage is still resolved and checked
    assert errors("CreateCompletionResponse", chunk, finish_reason_nullable) != []
