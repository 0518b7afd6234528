"""Training (three stages, resume, time limit), the user-video corpus and the evaluation, on tiny data (CPU)."""

import json

import numpy as np
import pytest
import torch

from nuwaxl.cli import main
from nuwaxl.config import preset
from nuwaxl.errors import UserError
from nuwaxl.models.checkpoint import NuwaModels, load_checkpoint
from nuwaxl.train.evaluate import (
    FrameProbe,
    block_features,
    evaluate_videos,
    frechet,
    load_probe,
    parse_caption,
    score_video,
)
from nuwaxl.train.trainer import Corpus, Trainer, TrainOptions, condition_latents, mtd_clip
from nuwaxl.train.videos import folder_corpus, read_captions, synthetic_corpus

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_videos():
    return synthetic_corpus(0, 2, 300, 32)


def train(run, stage, steps, videos, **kw):
    models = NuwaModels.random(preset("tiny"))
    if (run / "models.safetensors").is_file():
        models = load_checkpoint(run / "models.safetensors")
    opts = TrainOptions(stage, steps, batch=2, depth=2, log_every=1, save_every=2, **kw)
    trainer = Trainer(run, models, Corpus(videos, models, CPU), opts, CPU, progress=False)
    return trainer, trainer.train()


def test_three_stages_train_and_change_the_weights(tmp_path, tiny_videos):
    run = tmp_path / "run"
    before = NuwaModels.random(preset("tiny")).state_dict()
    _, m = train(run, "vae-image", 3, tiny_videos)
    after_image = {k: v.clone() for k, v in m.state_dict().items()}
    spatial = "vae.encoder.conv_in.spatial.weight"
    temporal = "vae.encoder.conv_in.temporal.conv.weight"
    assert not torch.equal(after_image[spatial], before[spatial])  # spatial layers trained
    assert torch.equal(after_image[temporal], before[temporal])  # temporal layers still the identity
    _, m = train(run, "vae-temporal", 3, tiny_videos)
    assert not torch.equal(m.state_dict()[temporal], before[temporal])
    assert m.config.vae.scaling_factor != preset("tiny").vae.scaling_factor  # set from the latents' spread
    unet_key = "unet.conv_in.spatial.weight"
    vae_before_mtd = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("vae.")}
    _, m = train(run, "mtd", 3, tiny_videos)
    assert not torch.equal(m.state_dict()[unet_key], before[unet_key])
    after_mtd = m.state_dict()
    changed = [k for k, v in vae_before_mtd.items() if not torch.equal(after_mtd[k], v)]
    assert not changed, f"the mtd stage changed the frozen T-KLVAE: {changed[:3]}"
    record = load_checkpoint(run / "models.safetensors").trained_on  # what generation will warn against
    caption_words = {w for v in tiny_videos for c in v.captions for w in c.lower().replace(",", " ").split()}
    assert record.trained and record.resolution == 32 and set(record.words) == caption_words
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log].count("mtd") == 3 and all(np.isfinite(r["loss"]) for r in log)


class Payload:
    """Unpickling this runs code: exactly what a training state file must never be able to do."""

    def __reduce__(self):
        return (print, ("code ran while loading state.pt",))


def test_training_state_is_loaded_without_unpickling_objects(tmp_path, tiny_videos):
    import pickle

    run = tmp_path / "run"
    train(run, "mtd", 2, tiny_videos, time_limit_s=0.0)  # saves state.pt at once
    state = torch.load(run / "state.pt", weights_only=True)  # our own state is plain data
    torch.save({**state, "extra": Payload()}, run / "state.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(run, "mtd", 2, tiny_videos)


def test_pause_and_resume_continue_the_same_run(tmp_path, tiny_videos):
    run = tmp_path / "run"
    trainer, out = train(run, "mtd", 4, tiny_videos, time_limit_s=0.0)  # the limit is hit before the first step
    assert out is None and trainer.step == 0 and (run / "state.pt").is_file()
    trainer, out = train(run, "mtd", 3, tiny_videos)
    assert out is not None and trainer.step == 3


def test_a_run_killed_mid_stage_resumes_to_the_same_weights(tmp_path, tiny_videos, monkeypatch):
    _, straight = train(tmp_path / "a", "mtd", 4, tiny_videos)
    loss = Trainer.loss

    def dies_at_step_3(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return loss(self)

    monkeypatch.setattr(Trainer, "loss", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", "mtd", 4, tiny_videos)  # saved at step 2 (save_every=2), killed at step 3
    monkeypatch.setattr(Trainer, "loss", loss)
    trainer, resumed = train(tmp_path / "b", "mtd", 4, tiny_videos)
    assert trainer.step == 4
    for k, v in straight.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-6), k


def test_training_clips_follow_the_planner_patterns(tiny_videos):
    models = NuwaModels.random(preset("tiny"))
    corpus = Corpus(tiny_videos, models, CPU)
    rng = np.random.default_rng(0)
    opts = TrainOptions("mtd", 1, depth=2)
    seen = {mtd_clip(corpus, 16, opts, rng)[1].cond_slots for _ in range(200)}
    assert seen == {(), (0, 15), (0,)}  # global, local, autoregressive


def test_cli_train_writes_weights_log_and_export(tmp_path, capsys):
    run, export = tmp_path / "run", tmp_path / "w.safetensors"
    args = ["train", "--run", str(run), "--preset", "tiny", "--stories", "1", "--story-frames", "240", "--batch", "2",
            "--depth", "2", "--device", "cpu", "--no-progress"]
    assert main(args + ["--stage", "vae-image", "--steps", "2"]) == 0
    assert main(args + ["--stage", "mtd", "--steps", "2", "--export", str(export)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mtd"]["steps"] == 2 and "holdout_recon_psnr_db" in summary["vae-image"]
    assert load_checkpoint(export).unet.conv_in.spatial.weight.dtype == torch.float16


def write_mp4(frames, path):
    from nuwaxl.runtime.video import write_mp4  # PyAV: imported here, so the GPU test collects where it is missing

    write_mp4(frames, path)


def test_user_videos_load_with_per_frame_captions(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (5, 48, 64, 3), dtype=np.uint8)
    (tmp_path / "vids").mkdir()
    write_mp4(frames, tmp_path / "vids" / "a.mp4")
    (tmp_path / "caps.json").write_text(json.dumps({"a.mp4": [f"frame {i}" for i in range(5)]}))
    corpus = folder_corpus(tmp_path / "vids", tmp_path / "caps.json", 32)
    assert corpus[0].frames.shape == (5, 32, 32, 3) and corpus[0].captions[4] == "frame 4"
    rows = "video,frame,caption\n" + "".join(f"a.mp4,{i},frame {i}\n" for i in range(5))
    (tmp_path / "caps.csv").write_text(rows)
    assert read_captions(tmp_path / "caps.csv") == {"a.mp4": [f"frame {i}" for i in range(5)]}


@pytest.mark.parametrize("captions,message", [
    ({"a.mp4": ["only one"]}, r"a.mp4 has 5 frames but 1 captions"),
    ({}, r"no captions for \['a.mp4'\]"),
    ({"a.mp4": ["x"] * 5, "b.mp4": ["y"]}, r"captions for \['b.mp4'\], which are not in"),
    ({"a.mp4": "not a list"}, r"must be a list of strings"),
])
def test_user_video_errors_name_the_problem(tmp_path, captions, message):
    (tmp_path / "vids").mkdir()
    write_mp4(np.zeros((5, 32, 32, 3), np.uint8), tmp_path / "vids" / "a.mp4")
    (tmp_path / "caps.json").write_text(json.dumps(captions))
    with pytest.raises(UserError, match=message):
        folder_corpus(tmp_path / "vids", tmp_path / "caps.json", 32)


def test_csv_captions_with_a_gap_are_rejected(tmp_path):
    (tmp_path / "c.csv").write_text("video,frame,caption\na.mp4,0,x\na.mp4,2,y\n")
    with pytest.raises(UserError, match=r"lacks captions for frames \[1\]"):
        read_captions(tmp_path / "c.csv")


def test_frechet_distance_and_block_features():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 4))
    assert abs(frechet(a, a)) < 1e-6
    assert frechet(a, a + 3.0) == pytest.approx(36.0, rel=1e-6)  # a mean shift of 3 in 4 dims
    feats = np.arange(64, dtype=float).reshape(32, 2)
    blocks = block_features(feats, 16)
    assert blocks.shape == (2, 4) and np.allclose(blocks[:, 2:], 2.0)  # consecutive rows change by 2


def test_scores_use_the_prompts_attributes():
    assert parse_caption("Fred walks to the left and Dino jumps in the yard") == (1, frozenset({0, 3}))
    prompts = ["Fred stands in the yard"] * 4
    perfect = {"location": np.array([1] * 4), "characters": np.array([[1, 0, 0, 0, 0]] * 4, bool)}
    wrong = {"location": np.array([0] * 4), "characters": np.array([[0, 1, 0, 0, 0]] * 4, bool)}
    assert score_video(perfect, prompts).attribute_accuracy == 1.0
    s = score_video(wrong, prompts)
    assert s.attribute_accuracy == 0.0 and s.character_recall == 0.0


def test_bundled_probe_recognises_real_frames():
    """The probe shipped for the eval reads the renderer's ground truth (held-out stories, real frames)."""
    videos = synthetic_corpus(1000, 2, 120, 64)
    frames = [v.frames for v in videos]
    scores = evaluate_videos(frames, [v.captions for v in videos], frames, load_probe())
    assert scores["attribute_accuracy"] > 0.9 and abs(scores["avg_fd"]) < 1e-3


def test_fd_by_quarter_shows_where_a_video_decays():
    videos = synthetic_corpus(1000, 2, 120, 64)
    real = [v.frames for v in videos]
    decayed = [f.copy() for f in real]
    for f in decayed:  # the last quarter replaced by noise
        f[90:] = np.random.default_rng(0).integers(0, 255, f[90:].shape, dtype=np.uint8)
    fd = evaluate_videos(decayed, [v.captions for v in videos], real, load_probe())["avg_fd_by_quarter"]
    assert max(fd[:3]) < 1e-3 and fd[3] > 100, fd


def test_motion_and_identity_read_characters_by_colour():
    """Real frames: exactly the prompted characters found, each within 2.5 px of the renderer's label (the eyes move
    the centroid a little), real motion under 4 px per frame, no intruders, a steady colour. The same frames shuffled
    within their shots jump far more; a character repainted as another is an intruder (and missing); blank frames
    find nobody."""
    from nuwaxl.train.data import CAST, LongVideo
    from nuwaxl.train.evaluate import character_scores, find_characters, motion_summary

    video = LongVideo(1000, 0, 400, resolution=64)
    frames, captions = video.clip(range(400)), [video.caption(i) for i in range(400)]
    for i, found in enumerate(find_characters(frames, captions)):
        labels = video.labels(i)
        assert set(found) == set(labels.characters), i
        for c, (x, y) in zip(labels.characters, labels.positions, strict=True):
            assert np.hypot(found[c].x - 64 * x, found[c].y - 64 * y) < 2.5, (i, c)
    real = motion_summary([frames], [captions])
    assert real["presence"] == 1.0 and real["intruder_frames"] == 0.0 and real["motion_p95_px"] < 4.0, real
    assert real["colour_std"] < 5.0, real
    shuffled = np.concatenate([frames[s.start: s.start + s.length][np.random.default_rng(0).permutation(s.length)]
                               for s in video.shots])
    assert motion_summary([shuffled], [captions])["motion_p95_px"] > 5 * max(real["motion_p95_px"], 1.0)
    shot = video.shots[0]
    c = shot.actors[0].character
    other = next(o for o in range(len(CAST)) if o not in {a.character for a in shot.actors})
    morphed = frames[shot.start: shot.start + 20].copy()
    morphed[np.all(morphed == CAST[c][1], axis=-1)] = CAST[other][1]
    scores = character_scores(morphed, captions[shot.start: shot.start + 20])
    assert scores["intruded"] == 20 and scores["found"] < scores["asked"], scores
    blank = character_scores(np.zeros_like(frames[:10]), captions[:10])
    assert blank["moves"] == [] and blank["found"] == 0 and blank["asked"] > 0


def test_reference_rows_score_real_frames_and_their_reconstructions():
    from nuwaxl.runtime.pipeline import Pipeline
    from nuwaxl.train.evaluate import evaluate_reference

    pipe = Pipeline.from_preset("tiny", device="cpu")
    real = evaluate_reference(pipe, 40, stories=1, reconstruct=False)
    assert real["mode"] == "real" and real["num_frames"] == 40 and abs(real["avg_fd"]) < 1e-3
    vae = evaluate_reference(pipe, 40, stories=1)  # random tiny T-KLVAE: only whole clips of L=16 frames
    assert vae["mode"] == "vae" and vae["num_frames"] == 32 and vae["avg_fd"] > 1.0


@pytest.mark.slow
def test_bundled_weights_follow_held_out_prompts():
    """The acceptance bar (>= 80% caption-attribute accuracy), on a CPU-sized sample: 2 held-out stories of 46
    frames with generate's defaults (90% measured; 59% without the recommended guidance, 32% with random weights).
    The full-size numbers are in benchmarks/results/quality-small-h100-*.md."""
    from nuwaxl.runtime.pipeline import Pipeline
    from nuwaxl.train.evaluate import evaluate_generation

    pipe = Pipeline.from_pretrained(device="cpu")  # no path: the bundled weights
    scores = evaluate_generation(pipe, 46, stories=2, progress=False)
    assert scores["guidance_scale"] == 3.0 and scores["attribute_accuracy"] >= 0.8, scores


def test_eval_of_noise_scores_low_and_cli_writes_json(tmp_path, capsys):
    videos = synthetic_corpus(1000, 1, 32, 64)
    noise = [np.random.default_rng(0).integers(0, 255, v.frames.shape, dtype=np.uint8) for v in videos]
    scores = evaluate_videos(noise, [v.captions for v in videos], [v.frames for v in videos], FrameProbe().eval())
    assert scores["attribute_accuracy"] < 0.8 and scores["avg_fd"] > 0
    out = tmp_path / "s.json"
    assert main(["eval", "--preset", "tiny", "--frames", "16", "--stories", "1", "--steps", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["num_frames"] == 16


@pytest.fixture(scope="module")
def story_v2():
    """A held-out version-2 story whose boulder shows in frames far apart, its frames and captions."""
    from nuwaxl.train.data import LongVideo

    video = LongVideo(1000, 0, 1024, 64, version=2)
    return video, video.clip(range(1024)), [video.caption(i) for i in range(1024)]


def test_coherence_reads_the_unmentioned_state_and_sees_it_break(story_v2):
    """Real frames: the outfits read are the labels' (where the head is not hidden), and every coherence score is
    1. Outfits swapped in the second half, the boulder gone after its first showing, or a constant daylight each
    lower their score; a 16-frame video compares frames 8 apart."""
    from nuwaxl.train.data import BOULDER_COLOUR, OUTFITS, LongVideo
    from nuwaxl.train.evaluate import coherence_summary, read_state

    video, frames, captions = story_v2
    states = read_state(frames, captions)
    labelled = [(s.outfits.get(c), o) for i, s in enumerate(states)
                for c, o in zip(video.labels(i).characters, video.labels(i).outfits, strict=True)]
    assert np.mean([a == b for a, b in labelled]) > 0.95
    real = coherence_summary([frames], [captions])
    assert min(real[k] for k in ("identity_stability", "outfit_agreement", "boulder_persistence",
                                 "daylight_accuracy", "coherence")) > 0.99, real
    swapped = frames.copy()
    for f in swapped[512:]:
        masks = [(f == o).all(-1) for o in OUTFITS]
        for k, m in enumerate(masks):
            f[m] = OUTFITS[(k + 1) % len(OUTFITS)]
    broken = coherence_summary([swapped], [captions])
    assert broken["outfit_agreement"] < 0.5 and broken["identity_stability"] < 0.8, broken
    first = next(i for i, s in enumerate(states) if s.boulder is not None)
    gone = frames.copy()
    for f in gone[first + 1:]:
        boulder = (f == BOULDER_COLOUR).all(-1)
        f[boulder] = f[-1, 0]  # the ground
    assert coherence_summary([gone], [captions])["boulder_persistence"] < 0.1
    day = frames.copy()
    day[:, :3] = frames[0, :3]  # the sky of frame 0: no dusk
    assert coherence_summary([day], [captions])["daylight_accuracy"] < 0.9
    short = LongVideo(1000, 0, 16, 64, version=2)
    summary = coherence_summary([short.clip(range(16))], [[short.caption(i) for i in range(16)]])
    assert summary["coherence_gap_frames"] == 8 and summary["coherence"] > 0.99, summary


def test_eval_of_version_2_frames_adds_coherence_with_its_own_probe(story_v2):
    """The bundled version-2 probe reads version-2 frames (attribute accuracy on real frames), and the eval reports
    the coherence scores beside the real frames' own."""
    _, frames, captions = story_v2
    scores = evaluate_videos([frames[:256]], [captions[:256]], [frames[:256]], version=2)
    assert scores["story_version"] == 2 and scores["attribute_accuracy"] > 0.9, scores
    assert scores["coherence"] > 0.99 and scores["real_coherence"] == scores["coherence"]


def test_fdm_star_trains_on_consecutive_clips_only_and_warns_against_dod(tmp_path):
    """`train --ar-fraction 1` is the paper's FDM* baseline: every MTD clip is consecutive frames, the first given
    but in about one clip of ten (the first window of an AR video, which has none); the weights record it (and the
    story version), and generating with diffusion over diffusion warns."""
    from nuwaxl.runtime.pipeline import Pipeline

    videos = synthetic_corpus(0, 1, 300, 32, version=2)
    models = NuwaModels.random(preset("tiny"))
    rng = np.random.default_rng(0)
    opts = TrainOptions("mtd", 1, depth=2, ar_fraction=1.0)
    clips = [mtd_clip(Corpus(videos, models, CPU), 16, opts, rng)[1] for _ in range(400)]
    assert {c.cond_slots for c in clips} == {(0,), ()}
    assert 0.05 < np.mean([c.cond_slots == () for c in clips]) < 0.15
    assert all(np.array_equal(np.diff(c.positions), np.ones(15)) for c in clips)
    with pytest.raises(UserError, match="ar_fraction=1.5 must be between 0 and 1"):
        TrainOptions("mtd", 1, ar_fraction=1.5)
    run, export = tmp_path / "fdm", tmp_path / "fdm.safetensors"
    args = ["train", "--run", str(run), "--preset", "tiny", "--stories", "1", "--story-frames", "240", "--batch", "2",
            "--device", "cpu", "--no-progress", "--story-version", "2", "--ar-fraction", "1"]
    assert main(args + ["--stage", "mtd", "--steps", "2", "--export", str(export)]) == 0
    record = load_checkpoint(export).trained_on
    assert record.ar_fraction == 1.0 and record.story_version == 2
    pipe = Pipeline.from_pretrained(export, device="cpu")
    with pytest.warns(UserWarning, match="trained on consecutive short clips only .* use mode='ar'"):
        pipe.prepare("Fred walks in the yard", 46)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.prepare("Fred walks in the yard", 46, mode="ar")


def test_clips_with_no_frame_given_skip_the_condition_encode():
    """The MTD's condition latents (the T-KLVAE on the clip with its non-condition frames zeroed) equal a plain encode
    of the masked batch, while only the clips with a given frame go through the encoder: the others (global clips,
    an AR video's first window) take the one encoding of an all-zero clip."""
    models = NuwaModels.random(preset("tiny"), seed=0)
    vae = models.vae
    with torch.no_grad():  # temporal layers that mix frames, so a zeroed frame's neighbours matter
        for name, p in vae.named_parameters():
            if "temporal" in name:
                p.add_(0.05 * torch.randn_like(p))
    L, R = models.config.frames_per_call, models.config.resolution
    video = torch.rand(4, L, 3, R, R, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(4, L, 1, R, R)
    mask[0, [0, L - 1]] = 1.0  # a local clip
    mask[2, 0] = 1.0  # an autoregressive window
    given = [True, False, True, False]
    with torch.no_grad():
        blank = vae.encode(torch.zeros_like(video[:1]))[0]
        reference = vae.encode(video * mask)[0]
    seen = []
    encode = vae.encode
    vae.encode = lambda x: seen.append(x.shape[0]) or encode(x)
    cond = condition_latents(vae, video, mask, given, blank)
    assert seen == [2]
    torch.testing.assert_close(cond, reference, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cond[0], cond[1])  # the given frames reach the latents
    # Shapes that do not depend on the clips (CUDA graphs): every clip encoded, the same latents
    cond = condition_latents(vae, video, mask, torch.tensor(given), blank)
    assert seen == [2, 4]
    torch.testing.assert_close(cond, reference, atol=1e-5, rtol=1e-4)


def mtd_trainer(run, videos, **kw):
    models = NuwaModels.random(preset("tiny"), seed=0)
    with torch.no_grad():  # temporal layers that mix frames, so the condition encode depends on the clip
        for name, p in models.vae.named_parameters():
            if "temporal" in name:
                p.add_(0.05 * torch.randn_like(p))
    opts = TrainOptions("mtd", 3, batch=4, depth=2, **kw)
    return Trainer(run, models, Corpus(videos, models, CPU), opts, CPU, progress=False)


def test_the_cuda_graph_step_computes_the_eager_loss(tmp_path, tiny_videos):
    """A CUDA graph replays fixed shapes, so its step encodes every clip's condition (`given_rows` None) where an
    eager step encodes only the clips with a frame given: the same loss for the same clips and noise."""
    import dataclasses

    trainer = mtd_trainer(tmp_path / "run", tiny_videos)
    batches = [trainer._draw_mtd() for _ in range(4)]
    assert any(not all(b.given_rows) for b in batches) and any(any(b.given_rows) for b in batches)
    for batch in batches:
        with torch.no_grad():
            eager = trainer._loss_of(batch)
            fixed = trainer._loss_of(dataclasses.replace(batch, given_rows=None))
        torch.testing.assert_close(fixed, eager, atol=1e-6, rtol=1e-5)


def test_a_non_finite_loss_stops_training_before_anything_is_saved(tmp_path, tiny_videos, monkeypatch):
    """Losses are summed on the device and read at log lines and saves (no wait at every step); a non-finite one
    still stops the run, naming the steps, before a save could keep it."""
    run = tmp_path / "run"
    trainer = mtd_trainer(run, tiny_videos, save_every=2)  # log_every 50: the save at step 2 is the first check
    loss_of = Trainer._mtd_loss_of
    monkeypatch.setattr(Trainer, "_mtd_loss_of", lambda self, b: loss_of(self, b) * float("nan")
                        if self.step == 1 else loss_of(self, b))
    with pytest.raises(FloatingPointError, match="non-finite loss in steps 1-2 of mtd"):
        trainer.train()
    assert not (run / "state.pt").exists() and not (run / "models.safetensors").exists()


def test_compiled_mtd_steps_train_as_eager_steps_do(tmp_path, tiny_videos, monkeypatch):
    """`compile`: the step's loss through torch.compile (traced here with the "eager" backend: the graphs
    Inductor would get, run without compilation, which takes minutes on a CPU), the same logged losses."""
    from torch._dynamo.utils import counters

    import nuwaxl.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    losses = {}
    for compiled in (False, True):
        run = tmp_path / str(compiled)
        trainer = mtd_trainer(run, tiny_videos, log_every=1, compile=compiled)
        trainer.train()
        losses[compiled] = [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert counters["frames"]["ok"] >= 1  # torch.compile traced the loss
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-3)  # decomposed ops round differently


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")
def test_mtd_steps_replayed_as_a_cuda_graph_train_as_eager_steps_do(tmp_path):
    """The same clips and noise (one seed), the eager step against the captured one: the same logged losses and
    weights up to float rounding (bf16 autocast in both)."""
    videos = synthetic_corpus(0, 2, 300, 32)
    cuda = torch.device("cuda")
    out = {}
    for graphs in (False, True):
        run = tmp_path / str(graphs)
        models = NuwaModels.random(preset("tiny"), seed=0).to(cuda)
        opts = TrainOptions("mtd", 12, batch=4, depth=2, log_every=2, cuda_graphs=graphs)
        trainer = Trainer(run, models, Corpus(videos, models, cuda), opts, cuda, progress=False)
        out[graphs] = trainer.train().state_dict(), [json.loads(x)["loss"] for x in
                                                     (run / "log.jsonl").read_text().splitlines()]
        assert (trainer._graph is not None) == graphs
    np.testing.assert_allclose(out[True][1], out[False][1], rtol=2e-2)
    for k, v in out[False][0].items():
        torch.testing.assert_close(out[True][0][k], v, atol=2e-3, rtol=2e-2, msg=k)
