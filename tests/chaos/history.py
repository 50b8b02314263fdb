"""What each request of a chaos scenario saw, and the pure checker that judges it.

A client records, per request, a `History` of events: `sent`, `attempt` (one per router tried),
`token` (index and id; for the OpenAI API a text delta without an id), then exactly one
terminal event: `final` (finish reason and the usage the server reported) or `error` (a code).

`check` compares the histories with the single-process reference engine's completions and with
the usage records read from JetStream, and says for each request whether it failed (its
terminal event is an error, or it has none) and whether it changed (a token the reference did
not produce, beyond the near-tie rule of services/engine/compare.py), plus the protocol
violations: not exactly one terminal event, token indices not contiguous from 0, the final's
usage or request id inconsistent with the stream, not exactly one usage record, and tokens of
another request's reference in this request's stream (a leak between streams).

Seeded requests use the same rule on "effective logits": step k samples argmax(p_i / E_i) with
E_i ~ Exp(1) drawn from (seed, k) (services/engine/sampling.py), so the two candidates' scores,
times the temperature, are logits shifted by -T * log(E_i); a near-tie there is a near-tie of
the draw. Greedy requests use the plain logits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from services.engine.compare import LOGIT_TOL, Divergence, compare_greedy
from services.engine.sampling import SamplingParams, _step_noise, filter_logits

LEAK_NGRAM = 4  # tokens in a row of another request's reference output: a leak
LEAK_CHARS = 12  # characters in a row of another request's reference text (OpenAI: no ids)


@dataclass
class Event:
    kind: str  # sent | attempt | token | final | error
    t: float
    index: int = -1
    token_id: int | None = None
    text: str = ""
    code: str = ""
    finish_reason: str = ""
    prompt_tokens: int = -1
    completion_tokens: int = -1
    request_id: str = ""  # the id the server echoed in its final message


@dataclass
class History:
    request_id: str
    api: str  # grpc | openai
    prompt_ids: list[int]
    params: SamplingParams
    events: list[Event] = field(default_factory=list)

    # -- recording -------------------------------------------------------------------------

    def sent(self, t: float) -> None:
        self.events.append(Event("sent", t))

    def attempt(self, t: float, router: int) -> None:
        self.events.append(Event("attempt", t, index=router))

    def token(self, t: float, index: int, token_id: int | None, text: str = "") -> None:
        self.events.append(Event("token", t, index=index, token_id=token_id, text=text))

    def final(self, t: float, finish_reason: str, prompt_tokens: int, completion_tokens: int,
              text: str = "", request_id: str = "") -> None:
        self.events.append(Event("final", t, text=text, finish_reason=finish_reason,
                                 prompt_tokens=prompt_tokens,
                                 completion_tokens=completion_tokens, request_id=request_id))

    def error(self, t: float, code: str, message: str = "") -> None:
        self.events.append(Event("error", t, code=code, text=message))

    # -- reading ---------------------------------------------------------------------------

    @property
    def tokens(self) -> list[Event]:
        return [e for e in self.events if e.kind == "token"]

    @property
    def token_ids(self) -> list[int]:
        return [e.token_id for e in self.tokens if e.token_id is not None]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if e.kind in ("token", "final"))

    @property
    def terminals(self) -> list[Event]:
        return [e for e in self.events if e.kind in ("final", "error")]

    @property
    def ok(self) -> bool:
        t = self.terminals
        return len(t) == 1 and t[0].kind == "final"

    @property
    def start_t(self) -> float | None:
        return next((e.t for e in self.events if e.kind == "sent"), None)

    @property
    def end_t(self) -> float | None:
        t = self.terminals
        return t[-1].t if t else None

    @property
    def latency_s(self) -> float | None:
        if self.start_t is None or self.end_t is None:
            return None
        return self.end_t - self.start_t


@dataclass(frozen=True)
class Expected:
    """The reference engine's completion of one request."""

    token_ids: list[int]
    logits: list[torch.Tensor]  # the row each token came from
    finish_reason: str
    text: str  # token_ids decoded as the router does (skip_special_tokens)


@dataclass(frozen=True)
class UsageRow:
    request_id: str
    usage_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    migrations: int = 0

    @classmethod
    def from_proto(cls, rec) -> UsageRow:
        return cls(rec.request_id, rec.usage_id, rec.prompt_tokens, rec.completion_tokens,
                   rec.finish_reason, rec.migrations)


@dataclass
class Verdict:
    request_id: str
    failed: bool = False
    changed: bool = False
    error_code: str = ""
    near_tie: Divergence | None = None
    problems: list[str] = field(default_factory=list)  # protocol violations
    detail: str = ""  # what was received and expected, for a changed request


@dataclass
class Report:
    verdicts: dict[str, Verdict]
    problems: list[str] = field(default_factory=list)  # not tied to one request
    migrations: int = 0

    @property
    def requests(self) -> int:
        return len(self.verdicts)

    @property
    def failed(self) -> int:
        return sum(v.failed for v in self.verdicts.values())

    @property
    def changed(self) -> int:
        return sum(v.changed for v in self.verdicts.values())

    @property
    def near_ties(self) -> int:
        return sum(v.near_tie is not None for v in self.verdicts.values())

    @property
    def violations(self) -> list[str]:
        return self.problems + [f"{v.request_id}: {p}" for v in self.verdicts.values()
                                for p in v.problems]

    @property
    def error_codes(self) -> Counter:
        return Counter(v.error_code for v in self.verdicts.values() if v.failed)

    def summary(self, limit: int = 20) -> str:
        lines = [f"{self.requests} requests, {self.failed} failed {dict(self.error_codes)}, "
                 f"{self.changed} changed, {self.near_ties} near-tie, "
                 f"{len(self.violations)} violations, {self.migrations} migrations"]
        lines += [f"  near-tie (not compared further): {v.request_id} {v.near_tie}"
                  for v in self.verdicts.values() if v.near_tie is not None][:limit]
        lines += [f"  CHANGED: {v.request_id} {v.detail}" for v in self.verdicts.values()
                  if v.changed][:limit]
        lines += [f"  VIOLATION: {p}" for p in self.violations[:limit]]
        return "\n".join(lines)


def effective_logits(row: torch.Tensor, params: SamplingParams, step: int) -> torch.Tensor:
    """The row whose argmax is the token step `step` draws (the row itself when greedy), in
    logit units: T * (log softmax(filtered / T) - log E) = filtered - T log E + const."""
    if params.greedy:
        return row.float()
    x = filter_logits(row.float(), params) * params.temperature
    return x - params.temperature * torch.log(_step_noise(params.seed, step, x.numel()))


def compare_tokens(h: History, exp: Expected, tol: float = LOGIT_TOL
                   ) -> tuple[bool, Divergence | None]:
    """(changed, near-tie): the received ids against the reference's, near-tie rule on the
    reference's effective logits. A prefix (a request that failed midway) is no change."""
    got = h.token_ids
    want = exp.token_ids if h.ok else exp.token_ids[:len(got)]
    if got == want:
        return False, None
    rows = [effective_logits(r, h.params, k) for k, r in enumerate(exp.logits)]
    cmp = compare_greedy([want], [got], expected_logits=[rows], tol=tol)
    if cmp.near_ties:
        return False, cmp.near_ties[0]
    return bool(cmp.mismatches), None


def compare_text(h: History, exp: Expected, tokenizer_decode=None, tol: float = LOGIT_TOL
                 ) -> tuple[bool, Divergence | None]:
    """The OpenAI API carries text only: the received text against the reference's. On a
    difference, the divergence position is the longest reference prefix whose text the
    received text starts with, judged by the near-tie rule there. `tokenizer_decode(prompt_ids,
    ids)` is the completion text of `ids` after that prompt, as the router streams it."""
    got = h.text
    if (got == exp.text) if h.ok else exp.text.startswith(got):
        return False, None
    if tokenizer_decode is None:
        return True, None
    pos = 0
    while pos < len(exp.token_ids) and got.startswith(
            tokenizer_decode(h.prompt_ids, exp.token_ids[:pos + 1])):
        pos += 1
    if pos >= len(exp.logits):
        return True, None
    row = effective_logits(exp.logits[pos], h.params, pos)
    # the token received there is unknown: a near-tie needs a runner-up within tol
    top2 = torch.topk(row, 2).values
    gap = float(top2[0] - top2[1])
    if gap < tol:
        return False, Divergence(0, pos, exp.token_ids[pos], -1, (gap,))
    return True, None


def structure_problems(h: History) -> list[str]:
    problems = []
    terminals = h.terminals
    if len(terminals) != 1:
        problems.append(f"{len(terminals)} terminal events")
    if terminals and h.events[-1] is not terminals[0] and len(terminals) == 1:
        problems.append("events after the terminal event")
    indices = [e.index for e in h.tokens]
    if indices != list(range(len(indices))):
        first = next(i for i, (a, b) in enumerate(zip(indices, range(len(indices)),
                                                       strict=False)) if a != b)
        problems.append(f"token indices not contiguous from 0 (at {first}: {indices[first]})")
    final = next((e for e in terminals if e.kind == "final"), None)
    if final is not None:
        if final.completion_tokens != len(indices):
            problems.append(f"final says {final.completion_tokens} completion tokens, "
                            f"{len(indices)} streamed")
        if final.prompt_tokens != len(h.prompt_ids):
            problems.append(f"final says {final.prompt_tokens} prompt tokens, "
                            f"sent {len(h.prompt_ids)}")
        if final.request_id and final.request_id != h.request_id:
            problems.append(f"final carries request id {final.request_id}")
    return problems


def usage_problems(h: History, rows: list[UsageRow]) -> list[str]:
    if not h.ok:  # a request that failed: at most one record (none if its router died)
        return [f"{len(rows)} usage records for a failed request"] if len(rows) > 1 else []
    if len(rows) != 1:
        return [f"{len(rows)} usage records"]
    r, streamed = rows[0], len(h.tokens)
    problems = []
    if r.completion_tokens != streamed:
        problems.append(f"usage says {r.completion_tokens} completion tokens, client got "
                        f"{streamed}")
    if r.prompt_tokens != len(h.prompt_ids):
        problems.append(f"usage says {r.prompt_tokens} prompt tokens, sent {len(h.prompt_ids)}")
    if not r.usage_id:
        problems.append("usage record without usage_id")
    return problems


def _ngrams(ids, n: int) -> set:
    """The runs of n items with at least n - 1 distinct ones: a random model's outputs often
    loop on one token (or spaces), and such runs are common to many requests."""
    runs = (tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return {r for r in runs if len(set(r)) >= n - 1}


def _after_divergence(got, want, n: int):
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                 min(len(got), len(want)))
    return got[max(0, first - n + 1):]


def find_leaks(histories: dict[str, History], expected: dict[str, Expected],
               changed: set[str]) -> list[str]:
    """Requests whose stream, from where it left its reference on, carries a run (of varied
    tokens, or characters for the OpenAI API) that is another request's reference output and
    not its own."""
    tokens = {rid: _ngrams(e.token_ids, LEAK_NGRAM) for rid, e in expected.items()}
    chars = {rid: _ngrams(e.text, LEAK_CHARS) for rid, e in expected.items()}
    leaks = []
    for rid in sorted(changed):
        h, own = histories[rid], expected[rid]
        grams, n = (tokens, LEAK_NGRAM) if h.api == "grpc" else (chars, LEAK_CHARS)
        got, want = (h.token_ids, own.token_ids) if h.api == "grpc" else (h.text, own.text)
        mine = _ngrams(_after_divergence(got, want, n), n) - grams[rid]
        others = [o for o, g in grams.items() if o != rid and mine & g]
        if others:
            leaks.append(f"{rid}: stream carries tokens of {', '.join(sorted(others)[:3])}")
    return leaks


def judge(h: History, exp: Expected, usage: list[UsageRow], tokenizer_decode=None,
          tol: float = LOGIT_TOL) -> Verdict:
    """One request's verdict."""
    v = Verdict(h.request_id, failed=not h.ok)
    if v.failed:
        errors = [e for e in h.terminals if e.kind == "error"]
        v.error_code = errors[-1].code if errors else "no_terminal_event"
    v.problems += structure_problems(h)
    v.problems += usage_problems(h, usage)
    if h.api == "grpc":
        v.changed, v.near_tie = compare_tokens(h, exp, tol)
    else:
        v.changed, v.near_tie = compare_text(h, exp, tokenizer_decode, tol)
        if not v.changed and h.ok and len(h.tokens) != len(exp.token_ids):
            v.changed = v.near_tie is None  # one chunk per token: a count that differs
    final = next((e for e in h.terminals if e.kind == "final"), None)
    finish = ""
    if final is not None and v.near_tie is None and final.finish_reason != exp.finish_reason:
        v.changed = True
        finish = f"; finish {final.finish_reason!r}, reference {exp.finish_reason!r}"
    if v.changed:
        v.detail = (f"got {h.token_ids} want {exp.token_ids}" if h.api == "grpc" else
                    f"got {h.text!r} ({len(h.tokens)} chunks) want {exp.text!r} "
                    f"({len(exp.token_ids)} tokens)") + finish
    return v


def check(histories: dict[str, History], expected: dict[str, Expected],
          usage: list[UsageRow], tokenizer_decode=None, tol: float = LOGIT_TOL) -> Report:
    by_request: dict[str, list[UsageRow]] = {}
    for row in usage:
        by_request.setdefault(row.request_id, []).append(row)
    report = Report({rid: judge(h, expected[rid], by_request.get(rid, []), tokenizer_decode, tol)
                     for rid, h in histories.items()})
    report.problems += find_leaks(histories, expected,
                                  {rid for rid, v in report.verdicts.items() if v.changed})
    ids = Counter(r.usage_id for r in usage if r.request_id in histories and r.usage_id)
    report.problems += [f"usage_id {u} on {n} records" for u, n in ids.items() if n > 1]
    report.migrations = sum(r.migrations for r in usage if r.request_id in histories)
    return report
