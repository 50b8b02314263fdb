"""Token windows for training and evaluation, cut from the works as one token stream.

Each work is encoded without BOS and ends with EOS, and the works are laid end to end. Every
window starts with BOS, as every prompt does when served (Tokenizer.encode adds it), then
seq_len tokens of the stream: inputs are its first seq_len tokens (BOS included), targets its
last seq_len. Training windows start at the beginning of a line (a token after one that ends in a
newline), so the model learns to continue from BOS the way a prompt such as "Romeo.\\n" asks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.model.tokenizer import Tokenizer
from services.train.data import Work


@dataclass(frozen=True)
class TokenStream:
    ids: torch.Tensor  # [N] long
    line_starts: torch.Tensor  # [M] long: positions that begin a line
    bos_id: int

    def __len__(self) -> int:
        return self.ids.numel()


def encode_works(tokenizer: Tokenizer, works: tuple[Work, ...] | list[Work]) -> TokenStream:
    ids: list[int] = []
    for work in works:
        ids += tokenizer.encode(work.text, add_bos=False)
        ids.append(tokenizer.eos_id)
    ends_line = torch.tensor([tokenizer.token_bytes(i).endswith(b"\n")
                              for i in range(tokenizer.vocab_size)])
    stream = torch.tensor(ids, dtype=torch.long)
    starts = (ends_line[stream[:-1]]).nonzero().squeeze(1) + 1
    return TokenStream(stream, starts, tokenizer.bos_id)


def _with_bos(stream: TokenStream, offsets: torch.Tensor, seq_len: int) -> torch.Tensor:
    span = offsets[:, None] + torch.arange(seq_len)[None, :]
    bos = torch.full((offsets.numel(), 1), stream.bos_id, dtype=torch.long)
    return torch.cat([bos, stream.ids[span]], dim=1)


def sample_windows(stream: TokenStream, batch_size: int, seq_len: int,
                   generator: torch.Generator) -> torch.Tensor:
    """[batch_size, seq_len + 1] windows (BOS, then seq_len tokens from a random line start)."""
    usable = stream.line_starts[stream.line_starts + seq_len <= len(stream)]
    if usable.numel() == 0:
        raise ValueError(f"the stream ({len(stream)} tokens) is shorter than one window")
    pick = torch.randint(0, usable.numel(), (batch_size,), generator=generator)
    return _with_bos(stream, usable[pick], seq_len)


def eval_windows(stream: TokenStream, seq_len: int, count: int | None = None) -> torch.Tensor:
    """Fixed, non-overlapping windows (evenly spaced over the stream when count limits them)."""
    total = len(stream) // seq_len
    if total == 0:
        raise ValueError(f"the stream ({len(stream)} tokens) is shorter than one window")
    index = torch.arange(total)
    if count is not None and count < total:
        index = torch.linspace(0, total - 1, count).round().long()
    return _with_bos(stream, index * seq_len, seq_len)
