"""Cross-request batching: the denoising steps of concurrent generations run as one model call.

A server runs each job in its own thread, all on one `SharedNetworks`. Every network call holds one lock (an
engine keeps per-shape buffers and CUDA graphs), and `denoiser` steps are merged: a job that asks for eps(x_t, t)
waits until every other job that is sampling right now has asked too (see below), then one of them runs all
their rows as one `unet_step` call and hands each job its rows. Rows carry their own timesteps, so jobs at
different steps, with different step counts, samplers or guidance merge alike; only the engine (frames per call,
resolution) must be the same, which one `SharedNetworks` guarantees. Each job draws its noise from its own
generators and applies its own sampler update, so its video does not depend on who it was batched with (up to the
rounding of batched kernels; tests/test_batching.py).

When to run a merged call: once every sampling job has asked, or, when some have not asked within `wait_s`, as soon
as the GPU has nothing queued (the last merged call's event has fired). A job that is late because its thread waits
for the GPU (the executor keeps the host at most two steps ahead) then still joins: running without it would not
start sooner on a busy GPU, and would split the jobs into groups that take turns (measured on an H200 with 16 jobs:
7.6 jobs per merged call on average, before this rule).

Out of memory in a merged step: the graphs are dropped, merged calls from then on hold fewer rows than the one that
failed, and the step runs again in smaller groups of jobs, so only a job whose own rows do not fit gets the error,
and its pipeline halves its batch as it does alone; no job fails for sharing a step. (The limit stays for the life of
the process: later steps do not run out of memory again and again.)

A merged call holds at most the step engine's largest batch (`max_rows`): the engine would split a larger one into
chunks anyway, so merging past it gains nothing and costs a concatenated copy of the jobs' prepared tensors (7.5 GB
per 69 rows for the paper UNet). Jobs are grouped in order under that cap, and a job with more rows runs alone.
Each group's bound step (its concatenated prepared tensors) is kept while the same group recurs.

Row buckets: a merged call of several jobs is padded (with copies of its first row, whose outputs are dropped) up to
the next bucket (`bucket_rows`: powers of two and 1.5x powers of two), or to the engine's largest batch, so that a
busy server meets a few shapes, not every row count (a job alone runs its own rows, as the pipeline does, and gets
exactly its lone video): each new shape costs warm-up runs and a CUDA-graph capture while the other jobs wait.
Powers of two alone padded the level-2 steps of 4 concurrent 1024-frame jobs (20 rows) to 32: 79 ms per merged step
on an H200 (benchmarks/results/serve-trace-paper-1024f-engines-grouped-h200.json). `warm(rows)` captures the
buckets up to `rows` before the first request (not counted in `on_merged`).

Fairness: every sampling job advances one step per merged call, so a short job that arrives while a long one runs
joins the next step instead of waiting for the long one to end (continuous batching, as vLLM does for tokens).
How many jobs run at once is the server's `max_active`; the rest wait in FIFO order.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nuwaxl.dtypes import TORCH_DTYPES, precision_name
from nuwaxl.engine.base import EngineNetworks
from nuwaxl.iospec import io_specs

POLL_S = 0.001  # how often a job that waited `wait_s` looks whether the GPU has gone idle


def bucket_rows(rows: int, max_rows: int | None) -> int:
    """The rows a merged call of `rows` rows runs as: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and
    1.5x powers of two: at most a third of a call is padding), at most the engine's `max_rows` (larger calls are
    split by the engine into `max_rows` chunks and a remainder, which is bucketed the same way)."""
    if max_rows is None or rows <= max_rows:
        power = 1 << (rows - 1).bit_length()
        bucket = 3 * power // 4 if power >= 4 and rows <= 3 * power // 4 else power
        return min(bucket, max_rows or bucket)
    full, rest = divmod(rows, max_rows)
    return full * max_rows + (bucket_rows(rest, max_rows) if rest else 0)


def _rows(parts: list[torch.Tensor], rows: int) -> torch.Tensor:
    """`parts` concatenated along the batch, then copies of the first row up to `rows` rows: one copy at most (none
    for a lone unpadded part)."""
    extra = rows - sum(t.shape[0] for t in parts)
    if extra:
        parts = [*parts, parts[0][:1].expand(extra, *parts[0].shape[1:])]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass(frozen=True)
class MergedCall:
    """What `SharedNetworks` tells `on_merged` of each merged call (the server's metrics)."""

    rows: int
    jobs: int
    padded: int  # the rows it ran as (its bucket; a job alone: its own rows)
    since_last_s: float | None  # from the previous merged call's start to this one's: the step period under load
    previous_gpu_s: float | None  # the previous merged call's GPU time, if it has finished by now (CUDA only)


@dataclass(eq=False)
class _Ask:
    """One job's step: its rows, and (once the merged call ran) its eps."""

    job: _Denoiser
    x_t: torch.Tensor
    t: torch.Tensor
    made: torch.cuda.Event | None  # the asking job's stream has produced x_t and t
    eps: torch.Tensor | None = None
    done: torch.cuda.Event | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class _Denoiser:
    """A job's bound denoiser: its prepared tensors (unet_prepare's outputs for its batch of calls)."""

    shared: SharedNetworks
    prepared: dict[str, torch.Tensor]
    rows: int = field(init=False)
    order: int = field(init=False)  # merged rows are laid out in this order, so an unchanged set of jobs
    _orders = itertools.count()     # reuses its concatenated prepared tensors from step to step

    def __post_init__(self):
        self.rows = next(iter(self.prepared.values())).shape[0]
        self.order = next(_Denoiser._orders)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.shared._step(self, x_t, t)

    def close(self) -> None:
        """Sampling is over for this batch of calls: nobody waits for its next step."""
        with self.shared._cv:
            self.shared._active.discard(self)
            self.shared._cv.notify_all()


class SharedNetworks:
    """`EngineNetworks` for several threads at once, with their denoising steps merged (module docstring).
    `on_merged(MergedCall)` is told of every merged call (for metrics): its size, the time since the previous one
    started and that one's GPU time, so that a step period well above the GPU time shows host-side overhead."""

    def __init__(self, nets: EngineNetworks, wait_s: float = 0.05,
                 on_merged: Callable[[MergedCall], None] | None = None):
        self.inner = nets
        self.spec = nets.spec
        self.tokenizer = nets.tokenizer
        self.engines = nets.engines
        self.wait_s = wait_s
        self.on_merged = on_merged
        self._lock = threading.RLock()  # one network call at a time
        self._cv = threading.Condition()
        self._active: set[_Denoiser] = set()  # sampling now: each merged call waits for their steps
        self._asks: list[_Ask] = []
        self._leading = False
        self._bound: dict[tuple, Callable[[dict], dict]] = {}  # the jobs of one merged call -> their bound step
        self._row_limit: int | None = None  # most rows per merged call, once one ran out of memory (never raised)
        self._last_start: float | None = None  # perf_counter at the previous merged call's start
        self._last_gpu: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # its start and end on the GPU
        step = (nets.engines or {}).get("unet_step")
        # the step engine's largest batch (None: live modules, any batch)
        self.max_rows = step.spec.batch_max if step is not None and step.spec is not None else None

    def _gpu_idle(self) -> bool:
        """The last merged call has finished on the GPU (always, on the CPU)."""
        return self._last_gpu is None or self._last_gpu[1].query()

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self._locked(self.inner.encode_prompts, prompts)

    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        return self._locked(self.inner.encode_frames, video)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self._locked(self.inner.decode_latents, latents)

    def release(self) -> None:
        with self._lock:
            self._bound = {}
            self.inner.release()

    def denoiser(self, context, cond, mask) -> _Denoiser:
        """As `EngineNetworks.denoiser`; the returned function's steps merge with other jobs' (close it when
        sampling ends, or the others wait `wait_s` for it at every step)."""
        prepared = self._locked(self.inner._run, "unet_prepare", {"context": context, "cond": cond, "mask": mask})
        job = _Denoiser(self, prepared)
        with self._cv:
            self._active.add(job)
        return job

    def denoise(self, x_t, t, context, cond, mask) -> torch.Tensor:
        job = self.denoiser(context, cond, mask)
        try:
            return job(x_t, t)
        finally:
            job.close()

    def _step(self, job: _Denoiser, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ask = _Ask(job, x_t, t, torch.cuda.current_stream().record_event() if x_t.is_cuda else None)
        with self._cv:
            self._asks.append(ask)
            self._cv.notify_all()
            deadline = time.monotonic() + self.wait_s
            while ask.eps is None and ask.error is None:
                everyone = {a.job for a in self._asks} >= self._active
                late = time.monotonic() >= deadline
                if not self._leading and self._asks and (everyone or (late and self._gpu_idle())):
                    self._leading, merged, self._asks = True, sorted(self._asks, key=lambda a: a.job.order), []
                    break
                # past the deadline: look at the GPU again every millisecond
                self._cv.wait(timeout=POLL_S if late else deadline - time.monotonic())
            else:
                return self._received(ask)
        try:  # this thread runs everyone's rows
            self._run_merged(merged)
        except BaseException as e:
            for a in merged:
                a.error = e
        with self._cv:
            self._leading = False
            self._cv.notify_all()
        return self._received(ask)

    @staticmethod
    def _received(ask: _Ask) -> torch.Tensor:
        if ask.error is not None:
            raise ask.error
        if ask.done is not None:  # the merged call ran on another job's stream
            torch.cuda.current_stream().wait_event(ask.done)
            ask.eps.record_stream(torch.cuda.current_stream())
        return ask.eps

    def _run_merged(self, merged: list[_Ask]) -> None:
        """All `merged` rows in as few calls as the row limit allows (one, until a merged call ran out of memory).
        A call of several jobs that runs out of memory lowers the limit below its rows, drops the graphs and runs
        again in smaller groups, so only a job whose own rows do not fit gets the error (its pipeline then halves
        its batch, as when it runs alone) and no job fails for sharing a step."""
        groups = self._groups(merged)
        with self._lock:  # bound steps of groups that no longer run: their concatenated tensors are freed
            current = {tuple(a.job for a in g) for g in groups}
            self._bound = {k: v for k, v in self._bound.items() if k in current}
        for group in groups:
            try:
                self._call(group)
            except torch.cuda.OutOfMemoryError as e:
                if len(group) == 1:
                    group[0].error = e
                    continue
                self._row_limit = sum(a.job.rows for a in group) - 1
                with self._lock:
                    if group[0].made is not None:  # queued work may still use the graphs' memory pools
                        torch.cuda.synchronize()
                    self._bound = {}
                    self.inner.release()
                    torch.cuda.empty_cache()
                self._run_merged(group)  # the limit only falls: this ends

    def _groups(self, merged: list[_Ask]) -> list[list[_Ask]]:
        """Consecutive jobs whose rows fit under the engine's largest batch and the row limit (a job with more rows
        alone in its group)."""
        cap = min(self._row_limit or float("inf"), self.max_rows or float("inf"))
        groups: list[list[_Ask]] = []
        for a in merged:
            if groups and sum(b.job.rows for b in groups[-1]) + a.job.rows <= cap:
                groups[-1].append(a)
            else:
                groups.append([a])
        return groups

    def _call(self, merged: list[_Ask]) -> None:
        with self._lock:
            now, previous_gpu = time.perf_counter(), None
            since_last = None if self._last_start is None else now - self._last_start
            if self._last_gpu is not None and self._last_gpu[1].query():
                previous_gpu = self._last_gpu[0].elapsed_time(self._last_gpu[1]) / 1e3
            self._last_start = now
            stream = torch.cuda.current_stream() if merged[0].made is not None else None
            for a in merged:
                if stream is not None:
                    stream.wait_event(a.made)
            began = torch.cuda.Event(enable_timing=True) if stream is not None else None
            if began is not None:
                began.record(stream)
            composition = tuple(a.job for a in merged)  # the jobs themselves: an id could be reused
            rows = sum(j.rows for j in composition)
            padded = rows if len(composition) == 1 else \
                max(rows, min(bucket_rows(rows, self.max_rows), self._row_limit or rows << 1))
            bound = self._bound.get(composition)
            if bound is None:
                fixed = {k: _rows([j.prepared[k] for j in composition], padded) for k in composition[0].prepared}
                bound = self._bound[composition] = self.inner._bind("unet_step", fixed)
            eps = bound({"x_t": _rows([a.x_t for a in merged], padded),
                         "timesteps": _rows([a.t for a in merged], padded)})["eps"]
            done = None
            if stream is not None:
                done = torch.cuda.Event(enable_timing=True)
                done.record(stream)
                self._last_gpu = (began, done)
            start = 0
            for a in merged:
                a.eps, a.done = eps[start: start + a.job.rows], done
                start += a.job.rows
        if self.on_merged is not None:
            self.on_merged(MergedCall(start, len(merged), padded, since_last, previous_gpu))

    def warm(self, rows: int) -> list[int]:
        """Run one denoising step at every row bucket up to `rows` (zero inputs), so that their CUDA graphs are
        captured before the first request; returns the buckets."""
        buckets = sorted({bucket_rows(r, self.max_rows) for r in range(1, rows + 1)})
        on_merged, self.on_merged = self.on_merged, None  # not a request's step: kept out of the metrics
        try:
            self._warm(buckets)
        finally:
            self.on_merged = on_merged
        return buckets

    def _warm(self, buckets: list[int]) -> None:
        """One step per bucket on zero inputs shaped by the networks' I/O specs."""
        spec = self.spec
        specs = io_specs(spec.config, precision_name(spec.dtype), max(buckets), spec.frames_per_call)

        def zeros(name: str, rows: int) -> dict[str, torch.Tensor]:
            return {t.name: torch.zeros(t.concrete(rows), dtype=TORCH_DTYPES[t.dtype], device=spec.device)
                    for t in specs[name].inputs}

        for b in buckets:
            job = self.denoiser(**zeros("unet_prepare", b))
            try:
                varying = zeros("unet_step", b)
                job(varying["x_t"], varying["timesteps"])
            finally:
                job.close()
