"""Generation on the tiny preset: batching invariance, determinism, streaming order, AR baseline."""

import numpy as np
import pytest
import torch
from conftest import KW, STORY, frame_diff

from nuwaxl.errors import UserError
from nuwaxl.runtime.executor import Executor, PromptBank, SamplingOptions
from nuwaxl.runtime.pipeline import to_uint8
from nuwaxl.runtime.planner import call_prompts, frame_prompts, plan_dod


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp-2m"])
def test_batched_generation_equals_call_by_call(tiny_pipe, sampler):
    """Per-call generators make the video independent of batching. Tolerance: one uint8 level, because batched
    and single convolutions round differently (about 1e-6) and a value can cross a quantisation boundary."""
    batched = tiny_pipe(STORY, sampler=sampler, max_batch=None, **KW).frames
    single = tiny_pipe(STORY, sampler=sampler, max_batch=1, **KW).frames
    worst, mean = frame_diff(batched, single)
    assert worst <= 1 and mean < 0.01


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


def test_steps_and_sampler_default_to_what_the_checkpoint_recommends(tmp_path):
    from nuwaxl.config import preset
    from nuwaxl.errors import UserError
    from nuwaxl.models.checkpoint import NuwaModels, save_checkpoint, with_sampling
    from nuwaxl.runtime.pipeline import Pipeline

    plain = save_checkpoint(NuwaModels.random(preset("tiny")), tmp_path / "plain.safetensors")
    tuned = with_sampling(plain, tmp_path / "tuned.safetensors", num_inference_steps=7, sampler="dpmpp-2m")
    kw = dict(num_frames=16, frames_per_call=8)
    options = Pipeline.from_pretrained(plain, device="cpu").prepare(STORY, **kw).options
    assert (options.num_inference_steps, options.sampler) == (25, "ddim")
    pipe = Pipeline.from_pretrained(tuned, device="cpu")
    options = pipe.prepare(STORY, **kw).options
    assert (options.num_inference_steps, options.sampler) == (7, "dpmpp-2m")
    options = pipe.prepare(STORY, num_inference_steps=3, sampler="ddim", **kw).options
    assert (options.num_inference_steps, options.sampler) == (3, "ddim")
    for bad in ({"num_inference_steps": 0}, {"sampler": "euler"}):
        with pytest.raises(UserError, match="recommended"):
            with_sampling(plain, tmp_path / "bad.safetensors", **bad)


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
    (dict(guidance_scale=0.5), "guidance_scale=0.5 must be a finite number >= 1"),
    (dict(guidance_scale=float("nan")), "guidance_scale=nan must be a finite number >= 1"),
    (dict(guidance_scale=float("inf")), "guidance_scale=inf must be a finite number >= 1"),
    (dict(eta=float("nan")), "eta=nan must be a finite number >= 0"),
    (dict(memory_budget_gib=float("inf")), "memory_budget_gib=inf must be a positive number of GiB"),
    (dict(mode="bfs"), "unknown mode 'bfs'"),
    (dict(max_batch=0), "max_batch=0 must be at least 1"),
    (dict(num_frames=5000), "5000 frames cannot be reached with L=8 and depth 2 .*; use depth=5"),
])
def test_bad_arguments_fail_before_any_work(tiny_pipe, kwargs, message, monkeypatch):
    monkeypatch.setattr(tiny_pipe.nets, "denoiser", None)  # any model work would fail differently
    with pytest.raises(UserError, match=message):
        tiny_pipe.iter_frames(STORY, **{**KW, **kwargs, "depth": 2})


@pytest.mark.parametrize("bad", ["\x00", "\x1b[31m", "\r"])
def test_control_characters_in_prompts_are_refused(tiny_pipe, bad):
    with pytest.raises(UserError, match="prompt 2 contains the control character"):
        tiny_pipe.prepare(["a cat", f"a dog{bad}"], 16)
    tiny_pipe.prepare(["a cat\twith a tab"], 16)  # a tab is just white space


def test_large_requests_need_allow_large_and_say_what_they_take(tiny_pipe):
    from nuwaxl.config import LARGE_VIDEO_FRAMES
    from nuwaxl.runtime.pipeline import LargeRequest

    tiny_pipe.prepare(STORY, LARGE_VIDEO_FRAMES)  # the largest size that needs no confirmation
    # L=16: 1 + 2 + 20 + 297 + 4,445 + 66,667 calls; the finest level's batch holds 66,667 x 16 frames of
    # 32 x 32 x 3 values, fp32 on the device plus uint8 on the host.
    gib = 66_667 * 16 * 32 * 32 * 3 * 5 / 2**30
    with pytest.raises(LargeRequest, match=rf"1000000 frames is a large request: a depth-6 plan of 71,432 diffusion "
                                           rf"calls \(1,785,800 single-call UNet steps\) whose largest batch alone "
                                           rf"holds up to {gib:.1f} GiB of frames; ask for at most 3376 frames, bound "
                                           rf"memory with max_batch, or confirm with allow_large=True"):
        tiny_pipe.prepare(STORY, 1_000_000)
    request = tiny_pipe.prepare(STORY, 1_000_000, allow_large=True)
    assert [len(level) for level in request.plan.levels] == [1, 2, 20, 297, 4445, 66667]
    assert request.call_steps == 71_432 * 25
    assert tiny_pipe.seconds_per_call_step(request) > 0  # what the CLI multiplies out before asking


def test_requests_outside_what_the_weights_know_warn_once_each(tiny_pipe, recwarn):
    from nuwaxl.config import TrainingRecord
    from nuwaxl.runtime.pipeline import prepare

    known = TrainingRecord(True, 32, ("a", "an", "cat", "dog", "on", "the", "walks"))
    kw = dict(tokenizer=tiny_pipe.nets.tokenizer, trained_on=known)
    prepare(tiny_pipe.config, ["a cat walks", "a dog"], 16, **kw)
    assert not recwarn.list  # within the vocabulary, at the trained resolution
    with pytest.warns(UserWarning, match=r"words these weights were not trained on: 'astronaut', 'moon'"):
        prepare(tiny_pipe.config, ["a cat walks", "an astronaut on the moon"], 16, **kw)
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) are longer than the 77 tokens .* 100,000 characters"):
        prepare(tiny_pipe.config, ["cat " * 25_000], 16, **kw)
    with pytest.warns(UserWarning, match="trained at 32 px; at 64 px expect worse videos .*omit resolution"):
        prepare(tiny_pipe.config.with_resolution(64), ["a cat"], 16, **kw)
    recwarn.clear()
    prepare(tiny_pipe.config.with_resolution(64), ["an astronaut"], 16, tokenizer=tiny_pipe.nets.tokenizer,
            trained_on=TrainingRecord(trained=False))
    assert not recwarn.list  # random weights know nothing: nothing to warn about


def test_non_finite_output_is_reported_with_a_fix_that_fits(tiny_pipe, monkeypatch):
    from nuwaxl.runtime.executor import Decoded

    monkeypatch.setattr(tiny_pipe.nets, "denoiser", lambda *fixed: lambda x, t: torch.full_like(x, float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite output in level 1 .* at float32: .* even in full "
                                                 "precision") as e:
        tiny_pipe(STORY, **KW)
    assert "precision=" not in str(e.value)  # already fp32: no advice to switch to it
    half = Decoded((), torch.zeros(1), None, torch.tensor(False), torch.float16)
    half.calls = tiny_pipe.prepare(STORY, 16).plan.levels[0]
    with pytest.raises(FloatingPointError, match="at float16: half precision overflowed; rerun with "
                                                 "precision='fp32'"):
        half.host_frames()


def test_progress_is_weighted_by_calls_times_steps(tiny_pipe, monkeypatch):
    """The bar counts call-steps: after the 1-call global level it shows 1/7 of the work, not 1/2 of the batches."""
    import nuwaxl.runtime.pipeline as pipeline

    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.n, self.seen = total, 0, []
            bars.append(self)

        def update(self, k=1):
            self.n += k
            self.seen.append(self.n)

        def set_postfix(self, **kw):
            pass

        def close(self):
            pass

    monkeypatch.setattr(pipeline, "tqdm", Bar)
    tiny_pipe(STORY, **KW)  # 1 global call, then 6 local calls in one batch; 4 steps each
    (bar,) = bars
    assert bar.total == 7 * 4 and bar.n == bar.total
    assert bar.seen[:5] == [1, 2, 3, 4, 10]  # the 6-call batch advances six times as fast


def test_from_pretrained_without_a_path_loads_the_bundled_weights():
    from nuwaxl.runtime.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(device="cpu")
    assert pipe.config.name == "small" and pipe.nets.spec.trained_on.trained
    assert pipe.nets.spec.sampling.guidance_scale == 3.0


def test_depth_first_order_gives_the_same_video(tiny_pipe):
    """Order changes only when frames arrive: per-call seeds make the video identical (up to batch rounding)."""
    level = tiny_pipe(STORY, **{**KW, "num_frames": 50, "depth": 2})
    depth = tiny_pipe(STORY, **{**KW, "num_frames": 50, "depth": 2, "order": "depth", "max_batch": 2})
    assert frame_diff(level.frames, depth.frames)[0] <= 1
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
    assert sizes == [1, 6, 3] + [1] * 6 and frame_diff(frames, expected)[0] <= 1

    monkeypatch.setattr(tiny_pipe.nets, "denoiser", lambda *a: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")))
    with pytest.raises(UserError, match="out of GPU memory with a single call per batch"):
        tiny_pipe(STORY, **KW)
    with pytest.raises(UserError, match="memory_budget_gib=0 must be a positive"):
        tiny_pipe.prepare(STORY, 40, memory_budget_gib=0)


def test_a_run_resumed_from_its_finished_levels_gives_the_same_video_and_skips_them(tiny_pipe, monkeypatch):
    kw = dict(num_frames=120, frames_per_call=8, num_inference_steps=3, seed=4, progress=False)
    levels = {}

    def keep(level, frames):
        levels[level] = {p: t.clone() for p, t in frames.items()}

    full = np.stack([f for _, f in sorted(tiny_pipe.iter_frames(["a red fox runs"], **kw, on_level=keep))])
    assert sorted(levels) == [1, 2]  # every level but the last
    batches = []
    denoiser = tiny_pipe.nets.denoiser
    monkeypatch.setattr(tiny_pipe.nets, "denoiser", lambda *a: batches.append(a[0].shape[0]) or denoiser(*a))
    finished = {**levels[1], **levels[2]}
    got = dict(tiny_pipe.iter_frames(["a red fox runs"], **kw, finished=finished))
    assert np.array_equal(np.stack([got[i] for i in range(120)]), full)
    assert batches == [17]  # only level 3's calls ran
    finished = {p: torch.zeros_like(t) for p, t in levels[1].items()}  # the given frames are what is used
    got = dict(tiny_pipe.iter_frames(["a red fox runs"], **kw, finished=finished))
    assert not np.array_equal(np.stack([got[i] for i in range(120)]), full)
