"""services.model.tokenizer.Tokenizer: round trips, and the same ids as transformers."""

from __future__ import annotations

import json
import pathlib

import jinja2
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from services.model.tokenizer import Tokenizer
from services.model.tokenizer_gen import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    USER_TOKEN,
    write_tokenizer,
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "café, naïve, résumé, Zürich",
    "日本語のテキスト 中文 Русский Ελληνικά",
    "emoji 🙂🚀👍🏽 and ❤️",
    "  spaces\tand\nnewlines\r\n  ",
    "numbers 1234567890 3.14159 -17",
    "def f(x):\n    return x ** 2\n",
    f"{USER_TOKEN}specials in text{EOS_TOKEN}",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "café?"}],
    [
        {"role": "system", "content": "One."},
        {"role": "system", "content": "Two."},
        {"role": "user", "content": "日本語で答えて"},
        {"role": "assistant", "content": "はい 🙂"},
        {"role": "user", "content": "Thanks\nbye"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}],
]


@pytest.fixture(scope="module", params=[512, 4096])
def model_dir(request, tmp_path_factory) -> pathlib.Path:
    out_dir = tmp_path_factory.mktemp(f"tok{request.param}")
    write_tokenizer(out_dir, request.param)
    return out_dir


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_properties(tok, model_dir):
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    expected_size = len(AutoTokenizer.from_pretrained(model_dir))
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.vocab_size == expected_size
    assert len(tok.id_to_token) == expected_size
    assert tok.id_to_token[0] == config["bos_token"] == BOS_TOKEN
    assert tok.id_to_token[1] == EOS_TOKEN
    assert {0, 1, 2} <= tok.special_ids


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.encode(text, add_bos=False) == ids[1:]
    assert tok.decode(ids) == BOS_TOKEN + text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace(USER_TOKEN, "").replace(
        EOS_TOKEN, ""
    )


@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text, add_bos=False)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_as_transformers(tok, hf, text):
    assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"]
    ids = tok.encode(text)
    assert tok.decode(ids) == hf.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_same_ids_as_transformers_any_text(tok, hf, text):
    assert tok.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf, messages, add_generation_prompt):
    expected_text = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    expected_ids = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert tok.render_chat(messages, add_generation_prompt) == expected_text
    assert tok.apply_chat_template(messages, add_generation_prompt) == expected_ids


def test_chat_template_layout(tok):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    ids = tok.apply_chat_template(messages)
    assert tok.decode(ids) == (
        f"{BOS_TOKEN}S{USER_TOKEN}U1{ASSISTANT_TOKEN}A1{EOS_TOKEN}{USER_TOKEN}U2{ASSISTANT_TOKEN}"
    )
    assert ids[-1] == tok.encode(ASSISTANT_TOKEN, add_bos=False)[0]
    assert ids.count(tok.bos_id) == 1


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(jinja2.exceptions.TemplateError, match="tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_ids_past_the_vocabulary_decode_to_nothing_like_transformers(tok, hf):
    """config.json's vocab_size may exceed the tokenizer's (DeepSeek-V3 pads it to 129,280)."""
    past = [tok.vocab_size, tok.vocab_size + 7, 129_279]
    smile = tok.encode("🙂 ok", add_bos=False)
    mixed = [tok.bos_id, smile[0], past[0], *smile[1:], past[1], tok.eos_id, past[2]]
    for skip in (False, True):
        assert tok.decode(past, skip_special_tokens=skip) == ""
        assert hf.decode(past, skip_special_tokens=skip) == ""
        known = [t for t in mixed if t not in past]
        assert tok.decode(mixed, skip_special_tokens=skip) == tok.decode(known, skip_special_tokens=skip)
        assert tok.decode(mixed, skip_special_tokens=skip) == hf.decode(mixed, skip_special_tokens=skip)
    assert all(tok.token_bytes(t) == b"" for t in past)
    assert tok.token_bytes(tok.vocab_size - 1) != b""


def test_negative_ids_are_rejected(tok):
    with pytest.raises(ValueError, match="negative"):
        tok.decode([3, -1])
    with pytest.raises(ValueError, match="negative"):
        tok.token_bytes(-1)


def test_loads_deepseek_style_config_and_template_file(tmp_path):
    write_tokenizer(tmp_path, 512)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # Published DeepSeek configs store tokens as serialised AddedTokens; newer transformers
    # versions move the template into chat_template.jinja.
    config["bos_token"] = {"__type": "AddedToken", "content": BOS_TOKEN, "special": True}
    template = config.pop("chat_template")
    config_path.write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}[" + template + "]")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_id == 0
    assert tok.render_chat([{"role": "user", "content": "x"}]).startswith(
        BOS_TOKEN + "[" + BOS_TOKEN
    )


def test_rejects_a_tokenizer_without_byte_level_decoder(tmp_path):
    write_tokenizer(tmp_path, 512)
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.decoder = tokenizers.decoders.Metaspace()
    with pytest.raises(ValueError, match="byte-level"):
        Tokenizer(backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)


def test_rejects_unknown_special_token(tmp_path):
    write_tokenizer(tmp_path, 512)
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(backend, bos_token="<s>", eos_token=EOS_TOKEN)
