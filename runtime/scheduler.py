"""Level-by-level scheduler, free of torch (the scheduler decides, the executor runs).

`next_batch()` hands out up to `max_batch` calls of the coarsest unfinished level whose visual conditions are
all final; the executor runs them as one batched model call per denoising step; `complete()` marks their frames
final and returns the frames that can now be emitted in temporal order.
"""

from __future__ import annotations

from dataclasses import dataclass

from nuwaxl.runtime.planner import Call, Plan


@dataclass(frozen=True)
class Batch:
    level: int
    calls: tuple[Call, ...]


class LevelScheduler:
    def __init__(self, plan: Plan, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be at least 1")
        self.plan = plan
        self.max_batch = max_batch
        self._pending: list[list[Call]] = [list(level) for level in plan.levels]
        self._in_flight: set[tuple[int, int]] = set()
        self.final: set[int] = set()
        self.emitted = 0  # frames 0..emitted-1 have been handed out in order

    def next_batch(self) -> Batch | None:
        for calls in self._pending:
            if not calls:
                continue
            ready = [c for c in calls if all(p in self.final for p in c.cond_positions)]
            if not ready:
                if self._in_flight:
                    return None  # the coarser level is still running
                raise RuntimeError(f"level {calls[0].level} has calls whose conditions will never be produced")
            batch = ready[: self.max_batch]
            for c in batch:
                calls.remove(c)
                self._in_flight.add((c.level, c.index))
            return Batch(batch[0].level, tuple(batch))
        return None

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

    def done(self) -> bool:
        return not self._in_flight and not any(self._pending)

    def needed_later(self) -> set[int]:
        """Positions still needed as visual conditions by calls not yet run."""
        return {p for calls in self._pending for c in calls for p in c.cond_positions}
