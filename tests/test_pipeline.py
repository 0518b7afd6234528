"""Generation on the tiny preset: batching invariance, determinism, streaming order, AR baseline."""

import numpy as np
import pytest
import torch

from nuwaxl.errors import UserError
from nuwaxl.runtime.executor import Executor, PromptBank, SamplingOptions
from nuwaxl.runtime.pipeline import to_uint8
from nuwaxl.runtime.planner import call_prompts, frame_prompts, plan_dod

STORY = ["a red caveman walks", "a blue dinosaur jumps", "the sun sets"]
KW = dict(num_frames=40, frames_per_call=8, num_inference_steps=4, seed=3, progress=False)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_batched_generation_equals_call_by_call(tiny_pipe, sampler):
    """Per-call generators make the video independent of batching. Tolerance: one uint8 level, because batched
    and single convolutions round differently (about 1e-6) and a value can cross a quantisation boundary."""
    batched = tiny_pipe(STORY, sampler=sampler, max_batch=None, **KW).frames
    single = tiny_pipe(STORY, sampler=sampler, max_batch=1, **KW).frames
    diff = np.abs(batched.astype(int) - single.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_batched_latents_match_call_by_call(tiny_pipe):
    """The same property before quantisation: decoded pixels of a level agree to 1e-5."""
    plan = plan_dod(40, 8, 2, seed=1)
    per_frame = frame_prompts(STORY, 40)
    bank = PromptBank(tiny_pipe.nets, per_frame)
    ex = Executor(tiny_pipe.nets, tiny_pipe.schedule, SamplingOptions(num_inference_steps=3, sampler="ddpm"))
    (global_call,) = plan.levels[0]
    keyframes = ex.run((global_call,), bank.context([call_prompts(global_call, per_frame)]), bank.empty, {})[0]
    frames = dict(zip(global_call.positions, keyframes, strict=True))
    calls = plan.levels[1]
    together = ex.run(calls, bank.context([call_prompts(c, per_frame) for c in calls]), bank.empty, frames)
    alone = torch.cat([ex.run((c,), bank.context([call_prompts(c, per_frame)]), bank.empty, frames) for c in calls])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_same_seed_same_video_other_seed_other_video(tiny_pipe):
    a = tiny_pipe(STORY, **KW).frames
    b = tiny_pipe(STORY, **KW).frames
    c = tiny_pipe(STORY, **{**KW, "seed": 4}).frames
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_iter_frames_streams_in_temporal_order(tiny_pipe):
    seen = [pos for pos, frame in tiny_pipe.iter_frames(STORY, **{**KW, "max_batch": 2})]
    assert seen == list(range(40))
    out = tiny_pipe(STORY, **KW)
    assert out.frames.shape == (40, 32, 32, 3) and out.frames.dtype == np.uint8


def test_no_frame_is_changed_after_its_call(tiny_pipe, monkeypatch):
    """Each final frame is exactly what its own call produced: finer levels never touch coarser frames."""
    produced = {}
    finish = Executor.finish

    def spy(self, calls, pixels, *args, **kwargs):
        for b, call in enumerate(calls):
            for slot in call.gen_slots:
                produced[call.positions[slot]] = (call.level, to_uint8(pixels[b, slot]))
        return finish(self, calls, pixels, *args, **kwargs)

    monkeypatch.setattr(Executor, "finish", spy)
    out = tiny_pipe(STORY, **{**KW, "num_frames": 50, "depth": 2})
    levels = [produced[p][0] for p in range(50)]
    assert levels.count(1) == 8 and set(levels) == {1, 2}
    for pos in range(50):
        assert np.array_equal(out.frames[pos], produced[pos][1]), pos


def test_ar_baseline_generates_every_frame_once(tiny_pipe):
    out = tiny_pipe(STORY, mode="ar", ar_context=2, **KW)
    assert out.frames.shape[0] == 40 and out.plan.mode == "ar"
    assert [len(level) for level in out.plan.levels] == [1] * 7  # 8 + 6 * 6 >= 40


def test_guidance_defaults_to_what_the_checkpoint_recommends(tmp_path):
    from nuwaxl.config import preset
    from nuwaxl.models.checkpoint import NuwaModels, save_checkpoint, with_sampling
    from nuwaxl.runtime.pipeline import Pipeline

    plain = save_checkpoint(NuwaModels.random(preset("tiny")), tmp_path / "plain.safetensors")
    tuned = with_sampling(plain, tmp_path / "tuned.safetensors", guidance_scale=2.5)
    kw = dict(num_frames=16, frames_per_call=8)
    assert Pipeline.from_pretrained(plain, device="cpu").prepare(STORY, **kw).options.guidance_scale == 1.0
    pipe = Pipeline.from_pretrained(tuned, device="cpu")
    assert pipe.prepare(STORY, **kw).options.guidance_scale == 2.5
    assert pipe.prepare(STORY, guidance_scale=1.0, **kw).options.guidance_scale == 1.0


def test_guidance_runs_as_one_batched_call(tiny_pipe):
    calls = []
    denoiser = tiny_pipe.nets.denoiser

    def spy(*fixed):
        eps = denoiser(*fixed)

        def counted(x, t):
            calls.append(x.shape[0])
            return eps(x, t)
        return counted

    tiny_pipe.nets.denoiser = spy
    try:
        tiny_pipe(STORY, guidance_scale=3.0, **KW)
    finally:
        del tiny_pipe.nets.denoiser
    assert calls == [2] * 4 + [12] * 4  # (uncond, cond) x calls: 1 global, then 6 local calls


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_inference_steps=0), "num_inference_steps=0 must be between 1 and 1000"),
    (dict(sampler="euler"), "unknown sampler 'euler'"),
    (dict(guidance_scale=0.5), "guidance_scale=0.5 must be >= 1"),
    (dict(mode="bfs"), "unknown mode 'bfs'"),
    (dict(max_batch=0), "max_batch=0 must be at least 1"),
    (dict(num_frames=5000), "5000 frames cannot be reached"),
])
def test_bad_arguments_fail_before_any_work(tiny_pipe, kwargs, message):
    with pytest.raises(UserError, match=message):
        tiny_pipe.iter_frames(STORY, **{**KW, **kwargs, "depth": 2})


def test_non_finite_output_is_reported_with_a_fix(tiny_pipe, monkeypatch):
    monkeypatch.setattr(tiny_pipe.nets, "denoiser", lambda *fixed: lambda x, t: torch.full_like(x, float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite output in level 1 .* --precision fp32"):
        tiny_pipe(STORY, **KW)


def test_depth_first_order_gives_the_same_video(tiny_pipe):
    """Order changes only when frames arrive: per-call seeds make the video identical (up to batch rounding)."""
    level = tiny_pipe(STORY, **{**KW, "num_frames": 50, "depth": 2})
    depth = tiny_pipe(STORY, **{**KW, "num_frames": 50, "depth": 2, "order": "depth", "max_batch": 2})
    assert np.abs(level.frames.astype(int) - depth.frames.astype(int)).max() <= 1
    with pytest.raises(UserError, match="unknown order 'bfs'"):
        tiny_pipe.prepare(STORY, 50, order="bfs")


def test_out_of_memory_retries_with_smaller_batches(tiny_pipe, monkeypatch):
    """A batch that does not fit is put back and rerun in halves: the same video, and the user is told."""
    expected = tiny_pipe(STORY, **KW).frames
    denoiser, sizes = tiny_pipe.nets.denoiser, []

    def limited(context, cond, mask):
        sizes.append(cond.shape[0])
        if cond.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return denoiser(context, cond, mask)

    monkeypatch.setattr(tiny_pipe.nets, "denoiser", limited)
    with pytest.warns(UserWarning, match="out of GPU memory running 6 calls of level 2 .* at most 3"):
        frames = tiny_pipe(STORY, **KW).frames
    assert sizes == [1, 6, 3] + [1] * 6 and np.abs(frames.astype(int) - expected.astype(int)).max() <= 1

    monkeypatch.setattr(tiny_pipe.nets, "denoiser", lambda *a: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")))
    with pytest.raises(UserError, match="out of GPU memory with a single call per batch"):
        tiny_pipe(STORY, **KW)
    with pytest.raises(UserError, match="memory_budget_gib=0 must be a positive"):
        tiny_pipe.prepare(STORY, 40, memory_budget_gib=0)
