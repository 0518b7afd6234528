"""Cross-request batching (runtime/batching.py) on the tiny preset, on the CPU: concurrent jobs' denoising steps run
as merged model calls, each job's video is the one it gets alone, and a short job is not held up by a long one."""

import threading
import time
import warnings

import torch
from conftest import STORY, frame_diff

from nuwaxl.runtime.batching import SharedNetworks, bucket_rows
from nuwaxl.runtime.pipeline import Pipeline

A = dict(num_frames=40, frames_per_call=8, num_inference_steps=4, seed=3, progress=False)
B = dict(num_frames=22, frames_per_call=8, num_inference_steps=6, seed=5, sampler="ddpm", guidance_scale=2.0,
         progress=False)


def run_together(shared: Pipeline, jobs: dict[str, tuple[list[str], dict]],
                 start_after: dict[str, threading.Event]):
    """Each job in its own thread, a job named in `start_after` once its event is set; (videos, names by finish)."""
    out, finished, errors = {}, [], []

    def work(name):
        if name in start_after:
            assert start_after[name].wait(timeout=120), f"{name} never got its start signal"
        try:
            out[name] = shared(jobs[name][0], **jobs[name][1]).frames
            finished.append(name)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return out, finished


def test_concurrent_jobs_share_model_calls_and_get_their_own_videos(tiny_pipe):
    alone_a = tiny_pipe(STORY, **A).frames
    alone_b = tiny_pipe(["a green bird flies"], **B).frames
    merged = []
    shared = Pipeline(SharedNetworks(tiny_pipe.nets, on_merged=lambda call: merged.append((call.rows, call.jobs))))
    out, _ = run_together(shared, {"a": (STORY, A), "b": (["a green bird flies"], B)}, {})
    assert any(jobs == 2 for _, jobs in merged), merged  # steps of both jobs ran as one call
    for name, alone in (("a", alone_a), ("b", alone_b)):
        worst, mean = frame_diff(alone, out[name])
        assert worst <= 1 and mean < 1e-3, (name, worst, mean)  # batched kernels may round differently


def test_a_short_job_is_not_held_up_by_a_long_one(tiny_pipe):
    """Continuous batching: the short job joins the long one's steps and ends first, though it started later (once
    the long job has run 3 of its 8 x 3 levels of merged steps: an event, not a delay, so a slow machine cannot let the
    long job finish before the short one starts)."""
    long = dict(A, num_frames=120, num_inference_steps=8)
    short = dict(A, num_frames=8, num_inference_steps=2, seed=9)
    begun, merged = threading.Event(), []

    def on_merged(call):
        merged.append(call)
        if len(merged) == 3:
            begun.set()

    shared = Pipeline(SharedNetworks(tiny_pipe.nets, on_merged=on_merged))
    _, finished = run_together(shared, {"long": (STORY, long), "short": (STORY, short)}, {"short": begun})
    assert finished == ["short", "long"]


class _StubNets:
    """The two calls SharedNetworks makes of an engine, on tiny tensors: prepare (rows of 1) and a bound step."""

    spec = tokenizer = engines = None

    def _run(self, name, feeds):
        return {"p": torch.ones(feeds["cond"].shape[0])}

    def _bind(self, name, fixed):
        return lambda feeds: {"eps": 2 * feeds["x_t"] + fixed["p"]}


def test_row_buckets_are_powers_of_two_and_their_halfway_points_up_to_the_engines_largest_batch():
    assert [bucket_rows(r, 69) for r in (1, 2, 3, 5, 7, 9, 17, 20, 25, 33, 49, 64, 65, 69)] == \
        [1, 2, 3, 6, 8, 12, 24, 24, 32, 48, 64, 64, 69, 69]
    assert [bucket_rows(r, 4) for r in (3, 4, 5, 7, 9)] == [3, 4, 5, 7, 9]  # above it: chunks of 4 and a bucket
    assert [bucket_rows(r, None) for r in (1, 3, 5, 100)] == [1, 3, 6, 128]


def _recording(monkeypatch, nets: _StubNets) -> list[int]:
    """The rows of every step `nets` binds (once per merged group of jobs)."""
    seen = []
    bind = nets._bind
    monkeypatch.setattr(nets, "_bind", lambda name, fixed: (seen.append(fixed["p"].shape[0]), bind(name, fixed))[1])
    return seen


def _in_threads(fn, n: int) -> None:
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)


def test_merged_steps_run_at_bucketed_rows_and_each_job_gets_its_own(monkeypatch):
    """Five one-row jobs merge into one call of 6 rows (the 6th a copy of the first, dropped): a busy server meets
    few shapes, so few CUDA-graph captures (several seconds each with ONNX Runtime)."""
    nets = _StubNets()
    seen = _recording(monkeypatch, nets)
    shared = SharedNetworks(nets, wait_s=1.0)
    merged = []
    shared.on_merged = lambda call: merged.append((call.rows, call.jobs))
    jobs = [shared.denoiser(None, torch.zeros(1), None) for _ in range(5)]
    out = {}

    def ask(i):
        out[i] = jobs[i](torch.full((1,), float(i)), torch.zeros(1))

    _in_threads(ask, 5)
    assert merged == [(5, 5)] and seen == [6]
    assert [out[i].tolist() for i in range(5)] == [[1.0], [3.0], [5.0], [7.0], [9.0]]


def test_merged_calls_stay_within_the_engines_largest_batch_and_reuse_their_bound_steps(monkeypatch):
    """With an engine of at most 4 rows, jobs of 2, 2 and 3 rows run as a call of the first two (4 rows) and one of
    the third alone: merging past the engine's batch would only concatenate prepared tensors that the engine splits
    again. The groups' bound steps (concatenated once) are reused at the next step."""
    nets = _StubNets()
    seen = _recording(monkeypatch, nets)
    shared = SharedNetworks(nets, wait_s=1.0)
    shared.max_rows = 4
    merged = []
    shared.on_merged = lambda call: merged.append((call.rows, call.jobs))
    jobs = [shared.denoiser(None, torch.zeros(r), None) for r in (2, 2, 3)]
    out = {}

    def ask(i):
        for step in range(2):
            out[i, step] = jobs[i](torch.full((jobs[i].rows,), float(i + step)), torch.zeros(jobs[i].rows))

    _in_threads(ask, 3)
    assert merged == [(4, 2), (3, 1)] * 2, merged
    assert seen == [4, 3], seen  # bound once per group, not at every step
    assert [out[2, s].tolist() for s in range(2)] == [[5.0] * 3, [7.0] * 3]  # 2 * x_t + 1: the job's own rows


def test_warm_captures_every_row_bucket_before_the_first_request(tiny_pipe, monkeypatch):
    rows = []
    bind = tiny_pipe.nets._bind

    def recording(name, fixed):
        run = bind(name, fixed)
        return lambda feeds: (rows.append(feeds["x_t"].shape[0]), run(feeds))[1]

    monkeypatch.setattr(tiny_pipe.nets, "_bind", recording)
    merged = []
    assert SharedNetworks(tiny_pipe.nets, on_merged=merged.append).warm(5) == [1, 2, 3, 4, 6]
    assert rows == [1, 2, 3, 4, 6] and not merged  # warm-up steps stay out of the server's metrics


def test_a_late_job_still_joins_the_step_while_the_gpu_is_busy(monkeypatch):
    """Past `wait_s`, a merged call waits for missing jobs as long as the GPU still has work queued (a job is late
    because its thread waits for the GPU); once the GPU is idle it runs without them."""
    shared = SharedNetworks(_StubNets(), wait_s=0.01)
    merged = []
    shared.on_merged = lambda call: merged.append(call.jobs)
    busy_until = time.monotonic() + 0.3
    monkeypatch.setattr(shared, "_gpu_idle", lambda: time.monotonic() >= busy_until)
    early, late = (shared.denoiser(None, torch.zeros(1), None) for _ in range(2))
    out = {}

    def ask(name, job, delay):
        time.sleep(delay)
        out[name] = job(torch.full((1,), float(len(name))), torch.zeros(1))

    threads = [threading.Thread(target=ask, args=a) for a in (("e", early, 0.0), ("la", late, 0.1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert merged == [2], merged  # one call for both, though the late job came 10x wait_s after the early one
    assert out["e"].tolist() == [3.0] and out["la"].tolist() == [5.0]  # each job got its own rows
    early.close()
    merged.clear()  # the GPU is idle now: a job alone in a step no longer waits for a job that does not ask
    t0 = time.monotonic()
    late(torch.zeros(1), torch.zeros(1))
    assert merged == [1] and time.monotonic() - t0 < 1.0


def test_out_of_memory_in_a_merged_step_fails_no_job(tiny_pipe, monkeypatch):
    """A merged step that does not fit is rerun job by job; a job whose own rows do not fit halves its batch as
    when alone. Here at most 3 rows fit: job b's lone call alone would fit, merged with a's 6 calls it does not."""
    alone_a = tiny_pipe(STORY, **A).frames
    alone_b = tiny_pipe(["a green bird flies"], **B).frames
    bind, rows = tiny_pipe.nets._bind, []

    def limited(name, fixed):
        run = bind(name, fixed)

        def step(feeds):
            rows.append(feeds["x_t"].shape[0])
            if feeds["x_t"].shape[0] > 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return run(feeds)
        return step

    monkeypatch.setattr(tiny_pipe.nets, "_bind", limited)
    shared = Pipeline(SharedNetworks(tiny_pipe.nets))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pipeline's "retrying with at most N calls" warnings
        out, finished = run_together(shared, {"a": (STORY, A), "b": (["a green bird flies"], B)}, {})
    assert sorted(finished) == ["a", "b"]
    assert max(rows) > 3 and any(r <= 3 for r in rows)  # steps did not fit, and then ran smaller
    assert sum(r > 3 for r in rows) <= 5  # the limit learnt from a failure holds: no out-of-memory at every step
    for name, alone in (("a", alone_a), ("b", alone_b)):
        worst, mean = frame_diff(alone, out[name])
        assert worst <= 1 and mean < 1e-3, (name, worst, mean)
