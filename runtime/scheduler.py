"""Call scheduler, free of torch (the scheduler decides, the executor runs).

`next_batch()` hands out up to `max_batch` calls whose visual conditions are all final; the executor runs them as
one batched model call per denoising step (every call has the same shapes and timesteps, whatever its level);
`complete()` marks their frames final and returns the frames that can now be emitted in temporal order.

Orders: "level" runs the coarsest unfinished level first (the fewest, largest batches: throughput); "depth"
runs the ready calls whose segment starts earliest, coarser first on ties, so the first frames' subtree finishes
first and frames stream in temporal order (latency). The video is the same either way (per-call seeds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nuwaxl.runtime.planner import Call, Plan

Order = Literal["level", "depth"]


@dataclass(frozen=True)
class Batch:
    level: int
    calls: tuple[Call, ...]


class Scheduler:
    def __init__(self, plan: Plan, max_batch: int, order: Order = "level"):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be at least 1")
        if order not in ("level", "depth"):
            raise ValueError(f"order {order!r}: use 'level' or 'depth'")
        self.plan = plan
        self.max_batch = max_batch
        self.order = order
        self._pending: list[list[Call]] = [list(level) for level in plan.levels]
        self._in_flight: set[tuple[int, int]] = set()
        self.final: set[int] = set()
        self.emitted = 0  # frames 0..emitted-1 have been handed out in order

    def _ready(self, calls: list[Call]) -> list[Call]:
        return [c for c in calls if all(p in self.final for p in c.cond_positions)]

    def next_batch(self) -> Batch | None:
        pending = [c for calls in self._pending for c in calls]
        if not pending:
            return None
        if self.order == "level":
            first = next(calls for calls in self._pending if calls)
            ready = self._ready(first)
        else:
            ready = sorted(self._ready(pending), key=lambda c: (c.positions[0], c.level))
        if not ready:
            if self._in_flight:
                return None  # what they wait for is still running
            raise RuntimeError(f"calls {[(c.level, c.index) for c in pending[:4]]} wait for frames never produced")
        batch = ready[: self.max_batch]
        for c in batch:
            self._pending[c.level - 1].remove(c)
            self._in_flight.add((c.level, c.index))
        return Batch(min(c.level for c in batch), tuple(batch))

    def requeue(self, batch: Batch, max_batch: int) -> None:
        """Put a batch that failed (out of memory) back, and hand out at most `max_batch` calls from now on."""
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be at least 1")
        for c in batch.calls:
            self._in_flight.discard((c.level, c.index))
            level = self._pending[c.level - 1]
            level.append(c)
            level.sort(key=lambda call: call.index)
        self.max_batch = max_batch

    def complete(self, batch: Batch) -> list[int]:
        for c in batch.calls:
            self._in_flight.discard((c.level, c.index))
            new = {c.positions[i] for i in c.gen_slots}
            clash = new & self.final
            if clash:
                raise RuntimeError(f"frames {sorted(clash)[:5]} would be generated twice")
            self.final |= new
        start = self.emitted
        while self.emitted < self.plan.num_frames and self.emitted in self.final:
            self.emitted += 1
        return list(range(start, self.emitted))

    def skip(self, calls: tuple[Call, ...]) -> None:
        """Take calls whose frames are already known (a resumed run) out of the work; `complete` them next."""
        for c in calls:
            self._pending[c.level - 1].remove(c)
            self._in_flight.add((c.level, c.index))

    def level_done(self, level: int) -> bool:
        """Every call of `level` has completed."""
        return not self._pending[level - 1] and not any(lv == level for lv, _ in self._in_flight)

    def done(self) -> bool:
        return not self._in_flight and not any(self._pending)

    def needed_later(self) -> set[int]:
        """Positions still needed as visual conditions by calls not yet run."""
        return {p for calls in self._pending for c in calls for p in c.cond_positions}
