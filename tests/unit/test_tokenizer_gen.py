"""The generated tokenizer files: real BPE, exact size, deterministic, loadable everywhere."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from services.model import tokenizer_gen
from services.model.tokenizer_gen import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    PAD_TOKEN,
    USER_TOKEN,
    write_tokenizer,
)

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TEXTS = [
    "Hello, world! The quick brown fox.",
    "  leading spaces and\ttabs\nnew lines  ",
    "café, naïve, 日本語, emoji 🙂 and 🚀🚀",
    "digits 1234567 and 3.14159, prices $2.19",
    f"{USER_TOKEN}inline specials{ASSISTANT_TOKEN}",
    "",
]


@pytest.fixture(scope="module", params=[512, 4096])
def generated(request, tmp_path_factory) -> tuple[int, pathlib.Path]:
    out_dir = tmp_path_factory.mktemp(f"tok{request.param}")
    write_tokenizer(out_dir, request.param)
    return request.param, out_dir


def test_writes_the_three_files(generated):
    _, out_dir = generated
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(FILES)


def test_vocabulary_has_exactly_the_requested_size(generated):
    vocab_size, out_dir = generated
    backend = tokenizers.Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    assert backend.get_vocab_size(with_added_tokens=True) == vocab_size
    assert len(AutoTokenizer.from_pretrained(out_dir)) == vocab_size
    # Ids are dense: every id in range names a token.
    assert all(backend.id_to_token(i) is not None for i in range(vocab_size))


def test_special_tokens_sit_where_deepseek_puts_bos_and_eos(generated):
    _, out_dir = generated
    backend = tokenizers.Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    assert backend.token_to_id(BOS_TOKEN) == 0
    assert backend.token_to_id(EOS_TOKEN) == 1
    assert backend.token_to_id(PAD_TOKEN) == 2
    assert backend.token_to_id(USER_TOKEN) is not None
    assert backend.token_to_id(ASSISTANT_TOKEN) is not None
    assert "\uff5c" in BOS_TOKEN and "\u2581" in BOS_TOKEN


def test_is_a_real_byte_level_bpe(generated):
    _, out_dir = generated
    backend = tokenizers.Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    vocab = backend.get_vocab()
    assert set(tokenizers.pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
    text = "the serving system streams tokens to the user"
    ids = backend.encode(text, add_special_tokens=False).ids
    assert len(ids) < len(text) / 2  # merges learned from the corpus compress ordinary prose
    assert backend.decode(ids) == text


def test_large_vocab_is_padded_with_placeholders(tmp_path):
    write_tokenizer(tmp_path, 4096)
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    last = backend.id_to_token(4095)
    assert last.startswith("<｜place▁holder▁no▁") and last.endswith("｜>")
    assert backend.token_to_id(tokenizer_gen.placeholder_token(0)) is not None


def test_smallest_vocab_works_and_below_it_raises(tmp_path):
    write_tokenizer(tmp_path, MIN_VOCAB_SIZE)
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert backend.get_vocab_size(with_added_tokens=True) == MIN_VOCAB_SIZE
    with pytest.raises(ValueError, match="vocab_size"):
        write_tokenizer(tmp_path / "too_small", MIN_VOCAB_SIZE - 1)
    assert not (tmp_path / "too_small").exists()


def test_output_is_byte_identical_across_processes(tmp_path):
    script = (
        "import pathlib, sys\n"
        "from services.model.tokenizer_gen import write_tokenizer\n"
        "write_tokenizer(pathlib.Path(sys.argv[1]), 4096)\n"
    )
    repo_root = pathlib.Path(__file__).resolve().parents[2]
    for run, hash_seed in (("a", "1"), ("b", "2")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / run)],
            cwd=repo_root,
            env=env,
            check=True,
            timeout=60,
        )
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("text", TEXTS)
def test_transformers_adds_bos_like_the_post_processor(generated, text):
    _, out_dir = generated
    backend = tokenizers.Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    fast = PreTrainedTokenizerFast.from_pretrained(out_dir)
    ids = backend.encode(text).ids
    assert ids[0] == 0
    assert fast(text)["input_ids"] == ids
    assert AutoTokenizer.from_pretrained(out_dir)(text)["input_ids"] == ids


def test_chat_template_renders_through_transformers(generated):
    _, out_dir = generated
    hf = AutoTokenizer.from_pretrained(out_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "café?"},
    ]
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        f"{BOS_TOKEN}Be brief.{USER_TOKEN}Hi{ASSISTANT_TOKEN}Hello!{EOS_TOKEN}"
        f"{USER_TOKEN}café?{ASSISTANT_TOKEN}"
    )
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == 0 and ids.count(0) == 1  # BOS from the template only, not added twice
    assert hf.decode(ids) == text
    no_prompt = hf.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_prompt == text.removesuffix(ASSISTANT_TOKEN)
