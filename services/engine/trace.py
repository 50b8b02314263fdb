"""A Chrome trace (JSON, open in Perfetto or chrome://tracing) of the EP forward passes.

Layout, like DeepSeek's published overlap profiles: one process per attention instance with
- thread "compute": every torch op the compute thread runs, one span per micro-batch per layer
  per operation (EMBED, ATTN-0, ATTN-1, FFN (dense layers), SHARED, COMBINE, LOGITS);
- threads "communication mb0" / "communication mb1": per micro-batch per MoE layer
  - DISPATCH: routing, encoding and writing every worker's share to its stream
    (ExpertClient.start_dispatch) until every request was out: per worker the earlier of
    gRPC's write completion and its reply's arrival (the poller may report a write done only
    after its reply is in, and a reply proves its request was sent);
  - MLP: the remote experts, on the worker the combine waited for (the one whose reply came
    last): the compute time it reported (DispatchResponse.compute_seconds), placed to end when
    its reply arrived here: [reply - compute_seconds, reply]. The worker's clock is never
    compared with this one: only its measured duration is used, subtracted from a local
    arrival time. So the span has the true length but sits as late as it can: the worker
    really finished earlier by the reply's encoding and transfer back, which the trace cannot
    separate. It is kept from starting before DISPATCH ends (spans on a thread must nest), so
    it can show shorter than the reported time; its args keep that (`compute_s`, `worker`)
    and every worker's (`worker_compute_s`, share order);
  - COMBINE: decoding the replies and adding them, once the last one is in (PendingDispatch.
    result()). The compute thread's COMBINE is a different op: residual + routed + shared.
  The gaps are the wire and the workers' queues: DISPATCH end -> MLP start is the request's
  transfer, the worker's decoding and queueing and the reply's transfer back; MLP end ->
  COMBINE start is the event loop getting back to the dispatch. A stand-in
  client with only dispatch() gets one DISPATCH span for the whole round trip;
- thread "steps": one span per forward (phase, tokens, micro-batches, plan version).
Two micro-batches' dispatches overlap in time, so each has its own communication thread
(complete events on one thread must nest). Timestamps are time.perf_counter() in microseconds,
all taken in this process.

Recording is bounded (`max_events`; later spans are counted, not kept) and thread-safe
(list.append); write() replaces the file atomically, so a reader never sees half a trace.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

COMPUTE = "compute"
STEPS = "steps"


def comm_track(micro_batch: int) -> str:
    return f"communication mb{micro_batch}"


class ChromeTrace:
    def __init__(self, path: str | Path, process_name: str = "attention",
                 max_events: int = 200_000, flush_every_s: float = 5.0) -> None:
        self.path = Path(path)
        self.process_name = process_name
        self.max_events, self.flush_every_s = max_events, flush_every_s
        self.pid = os.getpid()
        self.events: list[dict] = []
        self.dropped = 0
        self._tids: dict[str, int] = {}
        self._lock = threading.Lock()
        self._last_flush = time.perf_counter()

    def _tid(self, track: str) -> int:
        tid = self._tids.get(track)
        if tid is None:
            with self._lock:
                tid = self._tids.setdefault(track, len(self._tids) + 1)
        return tid

    def span(self, track: str, name: str, t0: float, t1: float, **args) -> None:
        """A complete event on `track` from t0 to t1 (time.perf_counter seconds)."""
        if len(self.events) >= self.max_events:
            self.dropped += 1
            return
        event = {"name": name, "cat": track.split()[0], "ph": "X", "pid": self.pid,
                 "tid": self._tid(track), "ts": round(t0 * 1e6, 3),
                 "dur": round(max(t1 - t0, 0.0) * 1e6, 3)}
        if args:
            event["args"] = args
        self.events.append(event)

    def document(self) -> dict:
        meta = [{"name": "process_name", "ph": "M", "pid": self.pid, "tid": 0,
                 "args": {"name": self.process_name}}]
        for track, tid in sorted(self._tids.items(), key=lambda kv: kv[1]):
            meta.append({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid,
                         "args": {"name": track}})
            meta.append({"name": "thread_sort_index", "ph": "M", "pid": self.pid, "tid": tid,
                         "args": {"sort_index": tid}})
        return {"traceEvents": meta + list(self.events), "displayTimeUnit": "ms",
                "otherData": {"dropped_events": self.dropped, "clock": "perf_counter"}}

    def write(self) -> Path:
        doc = self.document()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)
        self._last_flush = time.perf_counter()
        return self.path

    def due(self) -> bool:
        """Time for a periodic write (a long-running service's trace stays readable)."""
        return time.perf_counter() - self._last_flush >= self.flush_every_s
