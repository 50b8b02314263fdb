"""Greedy-output comparison with the near-tie rule: the check behind the master invariant.

Two implementations computing the same function in a different floating-point order may pick
different tokens only where two candidates are (nearly) tied. At the first position where the
token sequences differ, the divergence is accepted if, in every implementation whose logits
we have, the two candidate tokens' logits differ by less than `tol`; that sequence is then
not compared further (its continuation legitimately differs) and the report says so.

Tolerance: LOGIT_TOL = 1e-3 (absolute, fp32 logits). Implementations that differ only in
summation order agree to ~1e-6..1e-5 on our test models (the parity tests print the measured
maximum); a real bug moves logits by O(0.1) or more. 1e-3 leaves two orders of headroom on
the first and is two orders below the second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

LOGIT_TOL = 1e-3


@dataclass(frozen=True)
class Divergence:
    seq: int
    position: int
    expected: int
    got: int
    gaps: tuple[float, ...]  # |logit(expected) - logit(got)| in each implementation with logits

    def __str__(self) -> str:
        gaps = ", ".join(f"{g:.2e}" for g in self.gaps)
        return (f"seq {self.seq} pos {self.position}: expected {self.expected}, got {self.got} "
                f"(logit gaps {gaps})")


@dataclass
class Comparison:
    exact: int = 0
    near_ties: list[Divergence] = field(default_factory=list)
    mismatches: list[Divergence] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        lines = [f"{self.exact} exact, {len(self.near_ties)} near-tie, "
                 f"{len(self.mismatches)} mismatched"]
        lines += [f"  near-tie (not compared further): {d}" for d in self.near_ties]
        lines += [f"  MISMATCH: {d}" for d in self.mismatches]
        return "\n".join(lines)


def compare_greedy(
    expected: Sequence[Sequence[int]],
    got: Sequence[Sequence[int]],
    expected_logits: Sequence[Sequence[torch.Tensor]] | None = None,
    got_logits: Sequence[Sequence[torch.Tensor]] | None = None,
    tol: float = LOGIT_TOL,
) -> Comparison:
    """Compare token sequences; logits[i][p] is the [V] row token p of sequence i came from."""
    if len(expected) != len(got):
        raise ValueError("different numbers of sequences")
    if expected_logits is None and got_logits is None:
        raise ValueError("need the logits of at least one side to judge near-ties")
    result = Comparison()
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        pos = next((p for p, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if pos is None:
            if len(a) == len(b):
                result.exact += 1
            else:
                pos = min(len(a), len(b))
                result.mismatches.append(Divergence(i, pos, -1, -1, ()))
            continue
        gaps = []
        for logits in (expected_logits, got_logits):
            if logits is not None and pos < len(logits[i]):
                row = logits[i][pos].float()
                gaps.append(abs(float(row[a[pos]] - row[b[pos]])))
        d = Divergence(i, pos, a[pos], b[pos], tuple(gaps))
        (result.near_ties if gaps and all(g < tol for g in gaps) else result.mismatches).append(d)
    return result


def assert_same_greedy(expected, got, expected_logits=None, got_logits=None,
                       tol: float = LOGIT_TOL) -> Comparison:
    result = compare_greedy(expected, got, expected_logits, got_logits, tol)
    print(result.summary())
    if not result.ok:
        raise AssertionError(result.summary())
    return result
