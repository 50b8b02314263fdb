"""IncrementalDetokenizer: streamed deltas add up to Tokenizer.decode, never half a character."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.model.detokenizer import IncrementalDetokenizer
from services.model.tokenizer import Tokenizer
from services.model.tokenizer_gen import write_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    out_dir = tmp_path_factory.mktemp("tok")
    write_tokenizer(out_dir, 512)
    return Tokenizer.from_dir(out_dir)


def _single_byte_ids(tok: Tokenizer) -> dict[int, int]:
    return {
        tok.token_bytes(i)[0]: i
        for i in range(tok.vocab_size)
        if i not in tok.special_ids and len(tok.token_bytes(i)) == 1
    }


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push(token_id) for token_id in ids] + [detok.flush()]


@st.composite
def id_sequences(draw, tok: Tokenizer) -> list[int]:
    """Ids mixing whole tokens, specials, lone bytes that split or break UTF-8 characters,
    and ids past the tokenizer's vocabulary (a model's padded vocab_size emits them)."""
    byte_ids = _single_byte_ids(tok)
    specials = sorted(tok.special_ids)
    multi_byte_text = st.sampled_from(["é", "日本", "🙂", "🚀x", "ñ"])
    pieces = st.one_of(
        st.lists(st.integers(0, tok.vocab_size - 1), max_size=4),
        st.lists(st.sampled_from(specials), max_size=2),
        st.lists(st.sampled_from([byte_ids[b] for b in range(0x80, 0x100)]), max_size=4),
        multi_byte_text.map(lambda s: [byte_ids[b] for b in s.encode("utf-8")]),
        st.text(max_size=8).map(lambda s: tok.encode(s, add_bos=False)),
        st.lists(st.integers(tok.vocab_size, tok.vocab_size + 1000), max_size=2),
    )
    return [token_id for piece in draw(st.lists(pieces, max_size=12)) for token_id in piece]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_add_up_to_decode(tok, skip_special_tokens):
    @settings(max_examples=300, deadline=None)
    @given(ids=id_sequences(tok))
    def check(ids):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
        deltas = _stream(detok, ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens)

    check()


def test_never_emits_half_a_character(tok):
    byte_ids = _single_byte_ids(tok)
    text = "a日本語🙂é!"
    ids = [byte_ids[b] for b in text.encode("utf-8")]  # one token per byte: maximal splitting
    detok = IncrementalDetokenizer(tok)
    deltas = _stream(detok, ids)
    assert "".join(deltas) == text
    assert "\ufffd" not in "".join(deltas)
    assert [d for d in deltas if d] == list(text)  # each character appears once it is whole


def test_special_tokens_are_skipped_or_kept(tok):
    ids = [tok.bos_id, *tok.encode("hi", add_bos=False), tok.eos_id]
    assert "".join(_stream(IncrementalDetokenizer(tok), ids)) == "hi"
    kept = "".join(_stream(IncrementalDetokenizer(tok, skip_special_tokens=False), ids))
    assert kept == tok.decode(ids)
    assert kept.endswith(tok.id_to_token[tok.eos_id])


def test_unfinished_character_at_end_is_replaced_on_flush(tok):
    byte_ids = _single_byte_ids(tok)
    detok = IncrementalDetokenizer(tok)
    assert detok.push(byte_ids[0xF0]) == ""
    assert detok.push(byte_ids[0x9F]) == ""
    assert detok.flush() == "\ufffd" == tok.decode([byte_ids[0xF0], byte_ids[0x9F]])
    with pytest.raises(RuntimeError, match="flush"):
        detok.push(byte_ids[0x41])


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_prompt_ids_prime_the_stream(tok, data):
    prompt = data.draw(id_sequences(tok))
    output = data.draw(id_sequences(tok))
    primed = IncrementalDetokenizer(tok, prompt_ids=prompt)
    fed = IncrementalDetokenizer(tok)
    for token_id in prompt:
        fed.push(token_id)
    assert _stream(primed, output) == _stream(fed, output)


def test_prompt_ending_inside_a_character(tok):
    byte_ids = _single_byte_ids(tok)
    smile = [byte_ids[b] for b in "🙂".encode()]
    detok = IncrementalDetokenizer(tok, prompt_ids=[tok.bos_id, *smile[:2]])
    assert "".join(_stream(detok, smile[2:])) == "🙂"
    # From a prompt made of whole characters the prompt changes nothing.
    prompt = tok.encode("café 日本")
    output = tok.encode("語 🙂 done", add_bos=False)
    streamed = "".join(_stream(IncrementalDetokenizer(tok, prompt_ids=prompt), output))
    assert streamed == tok.decode(output)


def test_ids_past_the_vocabulary_add_no_text(tok):
    byte_ids = _single_byte_ids(tok)
    smile = [byte_ids[b] for b in "🙂".encode()]
    past = tok.vocab_size + 3
    # As the router builds it: a prompt (validated against the model's larger vocab_size)
    # and generated ids may both hold ids the tokenizer does not know.
    detok = IncrementalDetokenizer(tok, prompt_ids=[tok.bos_id, past, *smile[:2]])
    deltas = _stream(detok, [past, smile[2], past, smile[3], tok.vocab_size])
    assert deltas == ["", "", "", "🙂", "", ""]


def test_rejects_negative_id(tok):
    with pytest.raises(ValueError, match="negative"):
        IncrementalDetokenizer(tok).push(-1)
