"""Planner and scheduler: pure Python, tested with a fake executor (no torch)."""

import subprocess
import sys

import pytest

from nuwaxl.errors import UserError
from nuwaxl.runtime.planner import (
    call_prompts,
    call_seed,
    frame_prompts,
    max_frames,
    min_depth,
    plan_ar,
    plan_dod,
)
from nuwaxl.runtime.scheduler import Scheduler


def check_plan(plan):
    """Every wanted frame made exactly once, each call's conditions made by a coarser call, strides as the paper."""
    made = {}
    for call in plan.calls:
        assert len(call.positions) == plan.frames_per_call
        for slot in call.gen_slots:
            pos = call.positions[slot]
            assert pos not in made, f"frame {pos} generated twice"
            made[pos] = call.level
        for pos in call.cond_positions:
            assert made.get(pos, 10**9) < call.level, f"condition {pos} of {call} not made by a coarser call"
    assert set(range(plan.num_frames)) <= set(made)
    return made


@pytest.mark.parametrize("n,L,m,counts", [
    (1024, 16, 3, [1, 5, 69]),
    (226, 16, 2, [1, 15]),
    (3376, 16, 3, [1, 15, 225]),
    (16, 16, 1, [1]),
    (16, 16, 3, [1, 1, 1]),
    (910, 16, 3, [1, 5, 61]),
    (40, 8, 2, [1, 6]),
    (1, 4, 2, [1, 0]),
    (100, 5, 4, [1, 2, 7, 25]),
])
def test_dod_plan_covers_exactly(n, L, m, counts):
    plan = plan_dod(n, L, m)
    assert [len(level) for level in plan.levels] == counts
    made = check_plan(plan)
    for call in plan.calls:  # level k lies on the grid of stride (L-1)^(m-k)
        stride = (L - 1) ** (m - call.level)
        assert all(b - a == stride for a, b in zip(call.positions, call.positions[1:], strict=False))
        if call.level > 1:
            assert call.cond_slots == (0, L - 1)
    assert made[0] == 1


def test_1024_frames_tree_matches_the_paper_setting():
    plan = plan_dod(1024, 16, 3)
    assert plan.levels[0][0].positions == tuple(range(0, 3376, 225))
    assert [c.positions[0] for c in plan.levels[1]] == [0, 225, 450, 675, 900]
    assert plan.levels[2][-1].positions[:2] == (1020, 1021)


def test_depth_defaults_to_the_least_that_reaches():
    assert min_depth(226, 16) == 2 and min_depth(227, 16) == 3 and min_depth(16, 16) == 1
    assert plan_dod(1024, 16).depth == 3
    assert max_frames(16, 3) == 3376


def test_plan_errors_name_the_fix():
    with pytest.raises(UserError, match=r"300 frames cannot be reached with L=16 and depth 2 \(at most 226 frames\); "
                                        r"use depth=3"):  # the CLI says --depth 3 (test_cli)
        plan_dod(300, 16, 2)
    with pytest.raises(UserError, match="L=2 is too small"):
        plan_dod(10, 2, 2)
    with pytest.raises(UserError, match="frame count 0 is not positive"):
        plan_dod(0, 16, 2)
    with pytest.raises(UserError, match="ar_context=16 must be between 1 and L-1=15"):
        plan_ar(100, 16, context=16)


@pytest.mark.parametrize("n,L,k", [(1024, 16, 1), (100, 16, 4), (16, 16, 1), (17, 16, 1), (5, 16, 2)])
def test_ar_plan_covers_exactly(n, L, k):
    plan = plan_ar(n, L, context=k)
    check_plan(plan)
    for prev, call in zip(plan.calls, plan.calls[1:], strict=False):
        assert call.cond_positions == prev.positions[-k:]  # conditioned on the last k frames of the window before
        assert call.level == prev.level + 1
    assert len(plan.calls) == 1 + max(0, -(-(n - L) // (L - k)))


def test_prompts_spread_and_sampled_at_each_spacing():
    story = ["a", "b", "c", "d"]
    per_frame = frame_prompts(story, 226)
    assert per_frame[0] == "a" and per_frame[-1] == "d" and len(per_frame) == 226
    assert [per_frame.count(p) for p in story] == [57, 56, 57, 56]
    assert frame_prompts(list("xyz"), 3) == list("xyz")
    plan = plan_dod(226, 16, 2)
    assert call_prompts(plan.levels[0][0], per_frame) == [per_frame[p] for p in range(0, 226, 15)]
    tail = plan_dod(1024, 16, 3).levels[0][0]  # keyframes past the end reuse the last prompt
    assert call_prompts(tail, frame_prompts(story, 1024))[-1] == "d"
    with pytest.raises(UserError, match="5 prompts but only 3 frames"):
        frame_prompts(list("abcde"), 3)
    with pytest.raises(UserError, match="no prompts"):
        frame_prompts([], 3)


def test_call_seeds_are_stable_and_distinct():
    assert call_seed(0, 2, 3) == call_seed(0, 2, 3)
    seeds = {call_seed(s, lv, i) for s in range(3) for lv in range(1, 4) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert plan_dod(226, 16, 2, seed=7).levels[1][4].seed == call_seed(7, 2, 4)


def run_fake(plan, max_batch, order="level"):
    """Drive the scheduler with a fake executor; returns batches and, per batch, the frames it made emittable."""
    sched = Scheduler(plan, max_batch, order)
    batches, emitted, per_batch = [], [], []
    while (batch := sched.next_batch()) is not None:
        assert len(batch.calls) <= max_batch
        if order == "level":
            assert all(c.level == batch.level for c in batch.calls)
        assert all(p in sched.final for c in batch.calls for p in c.cond_positions)
        batches.append(batch)
        per_batch.append(sched.complete(batch))
        emitted += per_batch[-1]
    assert sched.done()
    return batches, emitted, per_batch


@pytest.mark.parametrize("max_batch", [1, 4, 1000])
def test_level_scheduler_batches_levels_and_emits_in_order(max_batch):
    plan = plan_dod(1024, 16, 3)
    batches, emitted, _ = run_fake(plan, max_batch)
    assert emitted == list(range(1024))
    assert [b.level for b in batches] == sorted(b.level for b in batches)  # level by level
    assert [c for b in batches for c in b.calls] == plan.calls  # every call once, coarse to fine
    if max_batch == 1000:
        assert [len(b.calls) for b in batches] == [1, 5, 69]  # one batched model call per level


def test_ar_scheduler_runs_windows_in_sequence():
    batches, emitted, _ = run_fake(plan_ar(100, 16), max_batch=8)
    assert all(len(b.calls) == 1 for b in batches) and emitted == list(range(100))


def test_scheduler_rejects_a_frame_made_twice():
    plan = plan_dod(40, 8, 2)
    sched = Scheduler(plan, 8)
    batch = sched.next_batch()
    sched.complete(batch)
    with pytest.raises(RuntimeError, match="generated twice"):
        sched.complete(batch)


def test_planner_and_scheduler_do_not_import_torch():
    code = ("import sys, nuwaxl.runtime.planner, nuwaxl.runtime.scheduler; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def calls_until_frame(batches, per_batch, frame: int) -> int:
    done = 0
    for batch, emitted in zip(batches, per_batch, strict=True):
        done += len(batch.calls)
        if frame in emitted:
            return done
    raise AssertionError(f"frame {frame} never emitted")


# Calls run before frames 0..15 of a 1024-frame video are final. Depth-first with max_batch 1: global, level-2 #0,
# level-3 #0. Level order must first finish level 2 (5 calls). With max_batch 16 both take a whole level-2 batch.
@pytest.mark.parametrize("max_batch,depth_calls,level_calls", [(1, 3, 7), (4, 9, 10), (16, 22, 22)])
def test_depth_first_order_streams_the_first_frames_first(max_batch, depth_calls, level_calls):
    plan = plan_dod(1024, 16, 3)
    batches, emitted, per_batch = run_fake(plan, max_batch, order="depth")
    assert emitted == list(range(1024))
    assert sorted((c.level, c.index) for b in batches for c in b.calls) == sorted(
        (c.level, c.index) for c in plan.calls)  # every call exactly once
    assert calls_until_frame(batches, per_batch, 15) == depth_calls
    level_batches, _, level_per_batch = run_fake(plan, max_batch, order="level")
    assert calls_until_frame(level_batches, level_per_batch, 15) == level_calls


def test_requeued_batch_runs_again_in_smaller_batches():
    """Out of memory: the failed batch goes back and every call still runs exactly once, at most 2 at a time."""
    plan = plan_dod(226, 16, 2)
    sched = Scheduler(plan, 1000)
    first = sched.next_batch()
    sched.complete(first)
    failed = sched.next_batch()
    assert len(failed.calls) == 15
    sched.requeue(failed, max_batch=2)
    runs = []
    while (batch := sched.next_batch()) is not None:
        assert len(batch.calls) <= 2
        runs += batch.calls
        sched.complete(batch)
    assert runs == list(plan.levels[1]) and sched.done() and sched.emitted == 226  # in 8 batches of <= 2
    with pytest.raises(ValueError, match="max_batch=0"):
        sched.requeue(first, 0)
