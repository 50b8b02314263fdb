"""The demo model's tokenizer: a DeepSeek-style byte-level BPE trained on the training works.

The same construction as the generated checkpoints' tokenizer (services/model/tokenizer_gen.py:
digit groups, byte-level pre-tokenizer, DeepSeek's special tokens with BOS 0 and EOS 1, BOS added
on encode, the chat template), trained on the training split only, so held-out text is encoded
with merges learnt without it.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from services.model.tokenizer_gen import save_tokenizer, train_bpe
from services.train.data import Work

DEFAULT_VOCAB_SIZE = 4096


def train_tokenizer(works: tuple[Work, ...] | list[Work],
                    vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    return train_bpe([w.text for w in works], vocab_size)


def write_tokenizer_files(out_dir: str | Path, tokenizer: Tokenizer) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json."""
    save_tokenizer(Path(out_dir), tokenizer)
