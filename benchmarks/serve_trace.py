"""A timeline of a server's network calls under load, to tell where the wall time of a load row goes.

`Trace.attach(shared)` wraps one `runtime.batching.SharedNetworks` (benchmark-only; the server is unchanged): every
merged denoising step (its rows, jobs, padded rows, host start and end) and every other network call made under its
lock (prompt encoding, `unet_prepare`, T-KLVAE encode / decode), each with CUDA events around it on the calling
thread's stream, so that the GPU's own timeline can be read after the run (`summary`). On the CPU only host times.

What `summary` reports: wall time split into GPU-busy (the union of all traced calls' GPU intervals) and idle; the
merged steps grouped by padded row count (count, mean GPU ms, mean period); the largest idle gaps of the GPU and
which host calls ran in them; whether a merged step ran out of memory (the row limit it left behind).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import torch


class Trace:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.ref = None
        self.shared = None

    def attach(self, shared) -> Trace:
        """Wrap `shared`'s merged step and locked calls (instance attributes: only this object is affected)."""
        self.shared = shared
        cuda = shared.spec.device.type == "cuda"
        if cuda:
            self.ref = torch.cuda.Event(enable_timing=True)
            self.ref.record()
        call, locked, step, told = shared._call, shared._locked, shared._step, shared.on_merged
        last = threading.local()  # the MergedCall that `_call` just told, in the thread that ran it

        def on_merged(merged_call):
            last.call = merged_call
            if told is not None:
                told(merged_call)

        def timed(kind: str, info, fn, *args, events=None):
            """`info()`: what to record of the call, asked once it has run."""
            start = end = None
            if cuda and events is None:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            h0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                h1 = time.perf_counter()
                if events is not None:  # the merged step's own events (after it waited for the jobs' inputs)
                    start, end = events() or (None, None)
                elif cuda:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                with self.lock:
                    self.events.append({"kind": kind, **info(), "host": (h0 - self.t0, h1 - self.t0),
                                        "gpu_events": (start, end), "thread": threading.current_thread().name})

        def traced_call(merged):
            last.call = None

            def info():
                m = last.call  # None if the call failed (out of memory)
                return {"rows": sum(a.job.rows for a in merged), "jobs": len(merged),
                        "padded": m.padded if m is not None else None}

            return timed("step", info, call, merged, events=(lambda: shared._last_gpu) if cuda else None)

        def traced_locked(fn, *args):
            name = args[0] if getattr(fn, "__name__", "") == "_run" else getattr(fn, "__name__", str(fn))
            return timed("call", lambda: {"name": name}, locked, fn, *args)

        def traced_ask(job, x_t, t):  # host time a job's thread spends asking for (and waiting on) its eps
            h0 = time.perf_counter()
            try:
                return step(job, x_t, t)
            finally:
                with self.lock:
                    self.events.append({"kind": "ask", "host": (h0 - self.t0, time.perf_counter() - self.t0),
                                        "thread": threading.current_thread().name})

        shared._call, shared._locked, shared._step, shared.on_merged = traced_call, traced_locked, traced_ask, on_merged
        return self

    def summary(self, wall_s: float) -> dict:
        if self.ref is not None:
            torch.cuda.synchronize()
        calls = []
        for e in self.events:
            if e["kind"] == "ask":
                continue
            g = None
            start, end = e["gpu_events"]
            if start is not None:
                g = (self.ref.elapsed_time(start) / 1e3, self.ref.elapsed_time(end) / 1e3)
            calls.append({k: v for k, v in e.items() if k != "gpu_events"} | {"gpu": g})
        calls.sort(key=lambda c: c["host"][0])
        out: dict = {"wall_s": round(wall_s, 3), "row_limit_after": getattr(self.shared, "_row_limit", None),
                     "calls": len(calls)}
        by_rows: dict[int, list] = defaultdict(list)
        for c in calls:
            if c["kind"] == "step" and c["padded"] is not None:  # None: the call failed (out of memory)
                by_rows[c["padded"]].append(c)
        starts = [c["host"][0] for c in calls if c["kind"] == "step"]
        out["failed_steps"] = sum(c["kind"] == "step" and c["padded"] is None for c in calls)
        out["steps_by_padded_rows"] = {
            str(r): {"count": len(cs), "jobs_mean": round(sum(c["jobs"] for c in cs) / len(cs), 2),
                     "rows_mean": round(sum(c["rows"] for c in cs) / len(cs), 2),
                     "host_ms_mean": round(1e3 * sum(c["host"][1] - c["host"][0] for c in cs) / len(cs), 2),
                     **_gpu_stats([c for c in cs if c["gpu"]])}
            for r, cs in sorted(by_rows.items())}
        others: dict[str, list] = defaultdict(list)
        for c in calls:
            if c["kind"] == "call":
                others[c["name"]].append(c)
        out["other_calls"] = {
            n: {"count": len(cs), "host_s_total": round(sum(c["host"][1] - c["host"][0] for c in cs), 3),
                **_gpu_stats([c for c in cs if c["gpu"]])}
            for n, cs in sorted(others.items())}
        asks = [e for e in self.events if e["kind"] == "ask"]
        out["asks"] = {"count": len(asks), "host_s_total": round(sum(e["host"][1] - e["host"][0] for e in asks), 3)}
        if starts:
            out["first_step_s"], out["last_step_start_s"] = round(starts[0], 3), round(starts[-1], 3)
        if any(c["gpu"] for c in calls):
            out |= self._gpu_timeline([c for c in calls if c["gpu"]])
        out["timeline"] = [{"kind": c["kind"], **({"name": c["name"]} if c["kind"] == "call" else
                                                  {"rows": c["rows"], "padded": c["padded"], "jobs": c["jobs"]}),
                            "host": [round(x, 4) for x in c["host"]],
                            "gpu": [round(x, 4) for x in c["gpu"]] if c["gpu"] else None} for c in calls]
        return out

    @staticmethod
    def _gpu_timeline(calls: list[dict]) -> dict:
        """GPU busy time as the union of the calls' GPU intervals, and the largest idle gaps with the host calls
        that started in them."""
        spans = sorted(c["gpu"] for c in calls)
        busy, gaps, cur = 0.0, [], list(spans[0])
        for s, e in spans[1:]:
            if s > cur[1]:
                busy += cur[1] - cur[0]
                gaps.append((cur[1], s))
                cur = [s, e]
            else:
                cur[1] = max(cur[1], e)
        busy += cur[1] - cur[0]
        gaps.sort(key=lambda g: g[0] - g[1])
        top = []
        for a, b in gaps[:12]:
            inside = [c["name"] if c["kind"] == "call" else f"step{c['padded']}" for c in calls
                      if a - 0.001 <= c["host"][0] <= b]
            top.append({"from_s": round(a, 3), "gap_ms": round(1e3 * (b - a), 1), "host_calls_in_gap": inside[:8]})
        return {"gpu_first_s": round(spans[0][0], 3), "gpu_last_s": round(cur[1], 3), "gpu_busy_s": round(busy, 3),
                "gpu_idle_in_span_s": round(cur[1] - spans[0][0] - busy, 3), "gpu_gaps_total": len(gaps),
                "largest_gpu_gaps": top}


def _gpu_stats(cs: list[dict]) -> dict:
    if not cs:
        return {}
    total = sum(c["gpu"][1] - c["gpu"][0] for c in cs)
    return {"gpu_ms_mean": round(1e3 * total / len(cs), 2), "gpu_s_total": round(total, 3)}
