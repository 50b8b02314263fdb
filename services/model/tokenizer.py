"""The run-time tokenizer: a byte-level BPE `tokenizer.json` plus the chat template.

Loads a checkpoint's tokenizer files (generated ones or a real DeepSeek-V3's) with the
`tokenizers` library and renders the chat template with jinja2, so serving never needs
transformers. Ids match transformers' for the same text and chat (tests check this).

The model may emit ids the tokenizer does not know: config.json's vocab_size counts embedding
rows, which DeepSeek pads past the tokenizer (V3: 129,280 rows, about 128.8k tokens). Such an
id decodes to empty text, as in Hugging Face tokenizers, and never fails a request.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers versions save the template
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token: str,
        eos_token: str,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        if not isinstance(backend.decoder, tokenizers.decoders.ByteLevel):
            raise ValueError("only byte-level BPE tokenizers (ByteLevel decoder) are supported")
        self._backend = backend
        self._bos_id = _required_id(backend, bos_token)
        self._eos_id = _required_id(backend, eos_token)
        self._chat_template = chat_template
        self._template_variables = {"bos_token": bos_token, "eos_token": eos_token}
        self._template_variables.update(special_tokens or {})
        self._compiled_template: jinja2.Template | None = None
        size = backend.get_vocab_size(with_added_tokens=True)
        self._id_to_token = tuple(backend.id_to_token(i) or "" for i in range(size))
        self._token_bytes = tuple(_byte_level_bytes(token) for token in self._id_to_token)
        self._special_ids = frozenset(
            token_id
            for token_id, token in backend.get_added_tokens_decoder().items()
            if token.special
        )

    @classmethod
    def from_dir(cls, path: str | pathlib.Path) -> Tokenizer:
        path = pathlib.Path(path)
        backend = tokenizers.Tokenizer.from_file(str(path / TOKENIZER_FILE))
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        special_tokens = {
            name: _token_content(config[name])
            for name in _NAMED_SPECIAL_TOKENS
            if config.get(name) is not None
        }
        for name in ("bos_token", "eos_token"):
            if name not in special_tokens:
                raise ValueError(f"{path / CONFIG_FILE} names no {name}")
        template_file = path / TEMPLATE_FILE
        if template_file.exists():
            chat_template = template_file.read_text(encoding="utf-8")
        else:
            chat_template = _default_template(config.get("chat_template"))
        return cls(
            backend,
            bos_token=special_tokens["bos_token"],
            eos_token=special_tokens["eos_token"],
            chat_template=chat_template,
            special_tokens=special_tokens,
        )

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def id_to_token(self) -> tuple[str, ...]:
        return self._id_to_token

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # BOS is prepended here rather than by the post-processor, so that a tokenizer.json
        # without one (as in some published checkpoints) still encodes like transformers.
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self._bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        self._check_ids(ids)
        # Unknown ids are dropped here rather than left to the backend, which skips them today.
        known = [token_id for token_id in ids if token_id < len(self._id_to_token)]
        return self._backend.decode(known, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token contributes to decoded text (a special token's own UTF-8);
        none for an id past the tokenizer's vocabulary."""
        self._check_ids((token_id,))
        return self._token_bytes[token_id] if token_id < len(self._token_bytes) else b""

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        return self._template().render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **self._template_variables,
        )

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        # The template writes BOS itself, so encoding must not add another.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)

    def _template(self) -> jinja2.Template:
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        if self._compiled_template is None:
            self._compiled_template = _jinja_environment().from_string(self._chat_template)
        return self._compiled_template

    def _check_ids(self, ids: Sequence[int]) -> None:
        # A negative id is no token of any model: a caller's bug, not a padded vocabulary.
        for token_id in ids:
            if token_id < 0:
                raise ValueError(f"token id {token_id} is negative")


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    # The same environment options and helpers transformers gives chat templates, so templates
    # written for it (DeepSeek's included) render identically here. Sandboxed: templates ship
    # inside checkpoints and are untrusted.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _token_content(value: str | dict) -> str:
    # tokenizer_config.json stores a token either as its text or as a serialised AddedToken.
    return value["content"] if isinstance(value, dict) else value


def _default_template(value: str | list | None) -> str | None:
    # Some configs hold several named templates; serving uses the one named "default".
    if isinstance(value, list):
        named = {entry["name"]: entry["template"] for entry in value}
        return named.get("default")
    return value


def _required_id(backend: tokenizers.Tokenizer, token: str) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"special token {token!r} is not in the vocabulary")
    return token_id


def _byte_level_unicode_to_byte() -> dict[str, int]:
    # Byte-level BPE spells every byte as a printable character: printable Latin-1 bytes stand
    # for themselves, the other bytes are shifted to code points from 256 upwards, in order.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in printable]
    mapping = {chr(b): b for b in printable}
    mapping.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return mapping


_UNICODE_TO_BYTE = _byte_level_unicode_to_byte()


def _byte_level_bytes(token: str) -> bytes:
    # As the ByteLevel decoder does: a token spelt entirely in byte characters stands for those
    # bytes; any other token (special tokens such as "<｜User｜>") stands for its own UTF-8.
    if all(char in _UNICODE_TO_BYTE for char in token):
        return bytes(_UNICODE_TO_BYTE[char] for char in token)
    return token.encode("utf-8")
