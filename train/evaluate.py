"""Evaluation without downloadable networks: a frame probe trained here on the procedural renderer's labels.

The probe (a small CNN on 64x64 frames) predicts a frame's location and which characters are on screen; its
penultimate features stand in for Inception features in Frechet distances:

- Avg-FD: Frechet distance between the features of generated frames and of real frames (the paper's Avg-FID),
  also per quarter of the videos (generated frames of quarter q against real frames of quarter q): decay along a
  video shows as a rising FD;
- Block-FD-16: the same over 16-frame blocks (mean features and mean absolute frame-to-frame change), standing in
  for B-FVD-16;
- caption-attribute accuracy: per frame, is the location the prompt names predicted, and is the predicted set of
  characters exactly the prompt's (the mean of the two);
- character consistency: how often a character the prompt names is detected, over the whole video and per quarter;
- motion and identity (no network): each character is found by its body colour (`find_characters`); the
  frame-to-frame displacement of a prompted character's centroid within a shot is compared with the real videos'
  (p50 / p95, in pixels of a 64-pixel frame); presence: how often a prompted character is found at all; intruders:
  frames showing a cast character the prompt does not name (a character morphing into another); colour spread: how
  far a character's body colour wanders over its time on screen.

Stories of version 2 (`nuwaxl.train.data`) carry state no caption mentions; `read_state` reads it from frames by
colour (each character's outfit below its head, the boulder, the daylight from the sky) and `state_scores` scores:

- identity stability: over a character's frames in a video, the share showing its most frequent outfit;
- long-term coherence: over pairs of frames at least `coherence_gap(N)` apart (256 in long videos, N/2 in short
  ones), the share that agree: the same character in the same outfit, a boulder seen in a location still there
  (within 0.1 of the frame width) when that location is shown again; and the share of frames whose daylight is
  within 0.1 of the story's (the only state a caption-driven model can know: it fades with the frame index).
  `coherence` is the mean of the three; real frames score above 0.99 (tested).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from nuwaxl.errors import UserError
from nuwaxl.files import atomic_output
from nuwaxl.runtime.executor import uint8_frames
from nuwaxl.train.data import BOULDER_COLOUR, CAST, HEAD, LOCATIONS, OUTFITS, LongVideo, daylight

PROBE_RES = 64
FEATURES = 32


class FrameProbe(nn.Module):
    def __init__(self):
        super().__init__()
        chans = (3, 32, 64, 96, 128)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1)
                                   for a, b in zip(chans[:-1], chans[1:], strict=True))
        self.features = nn.Linear(2 * chans[-1], FEATURES)
        self.location = nn.Linear(FEATURES, len(LOCATIONS))
        self.characters = nn.Linear(FEATURES, len(CAST))

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, 64, 64) in [-1, 1] -> (N, FEATURES)."""
        h = frames
        for conv in self.convs:
            h = F.silu(conv(h))
        return F.silu(self.features(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)))

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.embed(frames)
        return self.location(f), self.characters(f)


def to_probe_input(frames: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, 64, 64) float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != PROBE_RES:
        x = F.interpolate(x, size=(PROBE_RES, PROBE_RES), mode="bilinear", antialias=True, align_corners=False)
    return x


def _labelled_batch(rng: np.random.Generator, n: int, seed: int,
                    version: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    frames, locs, chars = [], [], []
    for _ in range(n):
        video = LongVideo(seed, int(rng.integers(1 << 20)), 400, PROBE_RES, version)
        i = int(rng.integers(400))
        lab = video.labels(i)
        frames.append(video.frame(i))
        locs.append(lab.location)
        chars.append([float(c in lab.characters) for c in range(len(CAST))])
    x = to_probe_input(np.stack(frames))
    # Generated frames are a little blurred and noisy: train on such frames too.
    blur = torch.from_numpy(rng.random(n) < 0.5)
    soft = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    x = torch.where(blur.view(-1, 1, 1, 1), soft, x) + 0.03 * torch.from_numpy(rng.standard_normal(x.shape)).float()
    return x, torch.tensor(locs), torch.tensor(chars)


def train_probe(steps: int = 1500, batch: int = 64, seed: int = 5000, progress: bool = True,
                version: int = 1) -> FrameProbe:
    """On stories of `seed` and `version` (not used to train the generator, nor held out for its evaluation)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    probe = FrameProbe()
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3)
    for step in tqdm(range(steps), desc="probe", disable=not progress):
        x, loc, chars = _labelled_batch(rng, batch, seed, version)
        loc_logits, char_logits = probe(x)
        loss = F.cross_entropy(loc_logits, loc) + F.binary_cross_entropy_with_logits(char_logits, chars)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * (step + 1) / steps))
    return probe.eval()


def save_probe(probe: FrameProbe, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
    with atomic_output(path) as tmp:
        save_file({k: v.to(dtype).contiguous() for k, v in probe.state_dict().items()}, str(tmp),
                  metadata={"format": "nuwaxl-probe", "features": str(FEATURES)})


# The bundled probe of each story version (version 2's in fp16: the bundled weights stay under 20 MiB together).
PROBE_FILES = {1: "probe.safetensors", 2: "probe-v2.safetensors"}


def bundled_probe_path(version: int = 1) -> Path:
    return Path(str(resources.files("nuwaxl").joinpath(f"assets/weights/{PROBE_FILES[version]}")))


def load_probe(path: str | Path | None = None, version: int = 1) -> FrameProbe:
    path = Path(path) if path else bundled_probe_path(version)
    if not path.is_file():
        raise UserError(f"frame probe not found: {path}; train one with "
                        f"`python -m nuwaxl.train.evaluate --story-version {version}`")
    probe = FrameProbe()
    probe.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return probe.eval()


def parse_caption(caption: str) -> tuple[int | None, frozenset[int]]:
    """The location and characters a caption names (words of the procedural vocabulary; case-insensitive)."""
    text = caption.lower()
    loc = next((i for i, (name, *_rest) in enumerate(LOCATIONS) if name in text), None)
    chars = frozenset(i for i, (name, *_rest) in enumerate(CAST) if name.lower() in text)
    return loc, chars


# A pixel belongs to a character when its colour is nearest that character's body colour among the cast, the prompted
# location's sky and ground, and black (eyes), and within this distance (RGB, 0-255); a character is present where
# at least MIN_BODY_PIXELS of a 64-pixel frame's pixels are its (its body covers 66-132 of them in real frames).
MAX_COLOUR_DISTANCE = 80.0
MIN_BODY_PIXELS = 20


@dataclass(frozen=True)
class Sighting:
    """A character found in a frame by its body colour: centroid in pixels of a PROBE_RES frame, mean body colour."""

    x: float
    y: float
    colour: tuple[float, float, float]


def probe_pixels(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 64, 64, 3) float in 0-255, resized as the probe sees them."""
    return to_probe_input(frames).permute(0, 2, 3, 1).numpy() * 127.5 + 127.5


def scene_colours(frame: np.ndarray, location: int | None, version: int) -> list:
    """The background colours that compete with the characters' for pixels: version 1 the prompted location's sky
    and ground; version 2 (daylight scales them) the frame's own top and bottom rows, plus outfits and boulder."""
    if version == 1:
        return [] if location is None else [LOCATIONS[location][1], LOCATIONS[location][2]]
    return [np.median(frame[:3].reshape(-1, 3), 0), np.median(frame[-2:].reshape(-1, 3), 0), *OUTFITS,
            BOULDER_COLOUR]


def nearest_colours(frame: np.ndarray, location: int | None, version: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of a frame (`colour_pixels`): the index of the nearest colour among the cast's, `scene_colours`
    and black (eyes), and whether it is within MAX_COLOUR_DISTANCE of it."""
    palette = np.array([c[1] for c in CAST] + scene_colours(frame, location, version) + [(0, 0, 0)], dtype=np.float32)
    dist = np.linalg.norm(frame[:, :, None, :] - palette, axis=-1)  # (h, w, P)
    return dist.argmin(-1), dist.min(-1) <= MAX_COLOUR_DISTANCE


def colour_pixels(frames: np.ndarray, version: int) -> np.ndarray:
    """The pixels the colour readers work on, float 0-255: version 1 resized to the probe's 64 px, version 2 (thin
    limbs, whose colours resizing would blend) as they are."""
    return probe_pixels(frames) if version == 1 else frames.astype(np.float32)


def classify_frames(frames: np.ndarray, prompts: list[str], version: int):
    """Per frame (N, H, W, 3) uint8: (its `colour_pixels`, the prompt's location, `nearest_colours`, and every cast
    character found by its cast colour (version 1: the body; 2: the head), prompted or not, with positions in
    pixels of a PROBE_RES frame)."""
    frames = colour_pixels(frames, version)
    scale = PROBE_RES / frames.shape[1]
    for frame, prompt in zip(frames, prompts, strict=True):
        loc = parse_caption(prompt)[0]
        nearest, close = nearest_colours(frame, loc, version)
        found = {}
        for c in range(len(CAST)):
            body = (nearest == c) & close
            ys, xs = np.nonzero(body)
            if len(xs) * scale**2 >= MIN_BODY_PIXELS:
                found[c] = Sighting(float(xs.mean()) * scale, float(ys.mean()) * scale,
                                    tuple(frame[body].mean(0).tolist()))
        yield frame, loc, nearest, close, found


def find_characters(frames: np.ndarray, prompts: list[str], version: int = 1) -> list[dict[int, Sighting]]:
    """Per frame, the characters `classify_frames` finds."""
    return [found for *_, found in classify_frames(frames, prompts, version)]


def character_scores(frames: np.ndarray, prompts: list[str], version: int = 1) -> dict:
    """Of one video: `moves` (pixel displacement of each prompted character found in two adjacent frames of one shot,
    that is of one prompt), `found` / `asked` (prompted characters found / prompted), `intruded` (frames where a cast
    character the prompt does not name is found), `colour_std` (per prompted character, the spread (RGB distance from
    the mean, averaged) of its body colour over all frames it is found in)."""
    seen = find_characters(frames, prompts, version)
    asked = [parse_caption(p)[1] for p in prompts]
    moves = [float(np.hypot(b[c].x - a[c].x, b[c].y - a[c].y))
             for i, (a, b) in enumerate(zip(seen[:-1], seen[1:], strict=True)) if prompts[i] == prompts[i + 1]
             for c in (a.keys() & b.keys() & asked[i])]
    colours: dict[int, list] = {}
    for found, chars in zip(seen, asked, strict=True):
        for c in found.keys() & chars:
            colours.setdefault(c, []).append(found[c].colour)
    spread = [float(np.linalg.norm(np.array(v) - np.mean(v, 0), axis=1).mean()) for v in colours.values() if len(v) > 1]
    return {"moves": moves, "found": sum(len(f.keys() & a) for f, a in zip(seen, asked, strict=True)),
            "asked": sum(len(a) for a in asked), "intruded": sum(bool(f.keys() - a) for f, a in zip(seen, asked,
                                                                                                strict=True)),
            "frames": len(prompts), "colour_std": spread}


def motion_summary(videos: list[np.ndarray], prompts: list[list[str]], version: int = 1) -> dict[str, float]:
    """Motion, presence and identity scores of videos (`character_scores`), all videos together."""
    parts = [character_scores(v, p, version) for v, p in zip(videos, prompts, strict=True)]
    moves = [m for part in parts for m in part["moves"]]
    spread = [x for part in parts for x in part["colour_std"]]
    p50, p95 = np.percentile(moves, [50, 95]).tolist() if moves else (float("nan"), float("nan"))
    total = {k: sum(part[k] for part in parts) for k in ("found", "asked", "intruded", "frames")}
    return {"motion_p50_px": p50, "motion_p95_px": p95,
            "presence": total["found"] / total["asked"] if total["asked"] else float("nan"),
            "intruder_frames": total["intruded"] / total["frames"],
            "colour_std": float(np.mean(spread)) if spread else float("nan")}


@dataclass(frozen=True)
class FrameState:
    """What a version-2 frame shows of its story's unmentioned state (`read_state`)."""

    location: int | None  # the prompt's
    outfits: dict[int, int]  # character -> outfit index (characters found whose outfit could be read)
    boulder: float | None  # its x in [0, 1], if found
    light: float | None  # the sky's brightness against the location's full-daylight sky


MIN_OUTFIT_PIXELS = 8  # of a 64-pixel frame, below a head (a real body shows 40-60)
MIN_BOULDER_PIXELS = 15  # a real boulder covers about 35


def read_state(frames: np.ndarray, prompts: list[str]) -> list[FrameState]:
    """Per version-2 frame: each found character's outfit (the outfit colour most of the pixels just below its head
    are nearest to), the boulder and the daylight."""
    res = frames.shape[1]
    area = (res / PROBE_RES) ** 2  # thresholds are in pixels of a PROBE_RES frame
    first_outfit = len(CAST) + 2  # scene_colours of version 2: sky, ground, the outfits, the boulder
    out = []
    for frame, loc, nearest, close, found in classify_frames(frames, prompts, 2):
        outfits = {}
        for c, s in found.items():
            x, top = round(s.x * res / PROBE_RES), round((s.y / PROBE_RES + HEAD * 1.2) * res)
            half = max(1, round(0.03 * res))
            box = nearest[top: top + round(0.12 * res), max(0, x - half): x + half + 1]
            ok = close[top: top + round(0.12 * res), max(0, x - half): x + half + 1]
            votes = np.bincount(box[ok & (box >= first_outfit) & (box < first_outfit + len(OUTFITS))] - first_outfit,
                                minlength=len(OUTFITS))
            if votes.sum() >= MIN_OUTFIT_PIXELS * area:
                outfits[c] = int(votes.argmax())
        ys, xs = np.nonzero((nearest == first_outfit + len(OUTFITS)) & close)
        light = None
        if loc is not None:
            light = float(np.median(frame[:3].reshape(-1, 3), 0).sum() / np.sum(LOCATIONS[loc][1]))
        out.append(FrameState(loc, outfits, float(xs.mean() / res) if len(xs) >= MIN_BOULDER_PIXELS * area else None,
                              light))
    return out


def coherence_gap(num_frames: int) -> int:
    """Frames two frames must lie apart for the long-term coherence scores: 256, or half of a shorter video."""
    return min(256, max(1, num_frames // 2))


def state_scores(states: list[FrameState], first_frame: int = 0) -> dict[str, list]:
    """One video's agreements (lists of booleans, to be pooled over videos): `stable` per outfit reading (the
    character's most frequent outfit?), `outfit_pairs` / `boulder_pairs` per far pair (`coherence_gap`), `light`
    per frame (within 0.1 of the story's daylight at frame `first_frame + index`)."""
    n, gap = len(states), coherence_gap(len(states))
    by_char: dict[int, list[tuple[int, int]]] = {}
    for i, s in enumerate(states):
        for c, o in s.outfits.items():
            by_char.setdefault(c, []).append((i, o))
    stable, outfit_pairs = [], []
    for seen in by_char.values():
        outfits = np.array([o for _, o in seen])
        stable += (outfits == np.bincount(outfits).argmax()).tolist()
        frames = np.array([i for i, _ in seen])
        far = (frames[None, :] - frames[:, None]) >= gap  # [a, b]: b at least gap after a
        outfit_pairs += (outfits[:, None] == outfits[None, :])[far].tolist()
    boulder_pairs = []
    shown = [i for i, s in enumerate(states) if s.boulder is not None]
    for i in shown:
        later = [j for j in range(i + gap, n) if states[j].location == states[i].location]
        boulder_pairs += [states[j].boulder is not None and abs(states[j].boulder - states[i].boulder) <= 0.1
                          for j in later]
    light = [s.light is not None and abs(s.light - daylight(first_frame + i)) <= 0.1 for i, s in enumerate(states)]
    return {"stable": stable, "outfit_pairs": outfit_pairs, "boulder_pairs": boulder_pairs, "light": light}


def coherence_summary(videos: list[np.ndarray], prompts: list[list[str]]) -> dict[str, float]:
    """Identity stability and long-term coherence of version-2 videos (`state_scores`), all videos pooled."""
    parts = [state_scores(read_state(v, p)) for v, p in zip(videos, prompts, strict=True)]
    pooled = {k: [x for part in parts for x in part[k]] for k in parts[0]}

    def share(xs):
        return float(np.mean(xs)) if xs else float("nan")

    out = {"identity_stability": share(pooled["stable"]), "outfit_agreement": share(pooled["outfit_pairs"]),
           "boulder_persistence": share(pooled["boulder_pairs"]), "daylight_accuracy": share(pooled["light"]),
           "coherence_gap_frames": coherence_gap(len(videos[0]))}
    out["coherence"] = float(np.nanmean([out["outfit_agreement"], out["boulder_persistence"],
                                         out["daylight_accuracy"]]))
    return out


@torch.no_grad()
def probe_frames(probe: FrameProbe, frames: np.ndarray, chunk: int = 256) -> dict[str, np.ndarray]:
    feats, locs, chars = [], [], []
    for i in range(0, len(frames), chunk):
        x = to_probe_input(frames[i: i + chunk])
        f = probe.embed(x)
        feats.append(f)
        locs.append(probe.location(f).argmax(1))
        chars.append(probe.characters(f) > 0)
    return {"features": torch.cat(feats).double().numpy(), "location": torch.cat(locs).numpy(),
            "characters": torch.cat(chars).numpy()}


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of a and b."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cb @ sqrt_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def block_features(features: np.ndarray, block: int = 16) -> np.ndarray:
    """(N, F) frame features -> (N // block, 2F): per block, the mean and the mean absolute change."""
    n = len(features) // block * block
    f = features[:n].reshape(-1, block, features.shape[1])
    return np.concatenate([f.mean(1), np.abs(np.diff(f, axis=1)).mean(1)], 1)


def quarter(seq, q: int):
    """The q-th (0-3) quarter of a video's per-frame sequence."""
    return seq[q * len(seq) // 4: (q + 1) * len(seq) // 4]


@dataclass
class VideoScores:
    location_accuracy: float
    characters_accuracy: float
    attribute_accuracy: float
    character_recall: float
    character_recall_by_quarter: list[float]


def score_video(probe_out: dict[str, np.ndarray], prompts: list[str]) -> VideoScores:
    """Ground-truth checks of one video against its per-frame prompts."""
    parsed = [parse_caption(p) for p in prompts]
    loc_ok = [probe_out["location"][i] == loc for i, (loc, _) in enumerate(parsed) if loc is not None]
    char_ok = [frozenset(np.flatnonzero(probe_out["characters"][i]).tolist()) == chars
               for i, (_, chars) in enumerate(parsed)]
    hits = [[bool(probe_out["characters"][i][c]) for c in chars] for i, (_, chars) in enumerate(parsed)]
    quarters = [[h for hs in quarter(hits, q) for h in hs] for q in range(4)]
    flat = [h for hs in hits for h in hs]
    loc_acc = float(np.mean(loc_ok)) if loc_ok else float("nan")
    char_acc = float(np.mean(char_ok))
    return VideoScores(loc_acc, char_acc, float(np.nanmean([loc_acc, char_acc])),
                       float(np.mean(flat)) if flat else float("nan"),
                       [float(np.mean(q)) if q else float("nan") for q in quarters])


def evaluate_videos(videos: list[np.ndarray], prompts: list[list[str]], references: list[np.ndarray],
                    probe: FrameProbe | None = None, version: int = 1) -> dict:
    """Scores of generated videos (each (N, H, W, 3) uint8 with N prompts) against real reference videos of story
    `version` (2 adds identity stability and long-term coherence)."""
    if len(videos) != len(prompts):
        raise UserError(f"{len(videos)} videos but {len(prompts)} prompt lists")
    for v, p in zip(videos, prompts, strict=True):
        if len(v) != len(p):
            raise UserError(f"a video of {len(v)} frames has {len(p)} prompts; give one prompt per frame")
    probe = probe or load_probe(version=version)
    gen = [probe_frames(probe, v) for v in videos]
    ref = [probe_frames(probe, v) for v in references]
    scores = [score_video(g, p) for g, p in zip(gen, prompts, strict=True)]
    gen_f = np.concatenate([g["features"] for g in gen])
    ref_f = np.concatenate([r["features"] for r in ref])
    out = {
        "videos": len(videos), "frames_per_video": len(videos[0]),
        "avg_fd": frechet(gen_f, ref_f),
        "attribute_accuracy": float(np.mean([s.attribute_accuracy for s in scores])),
        "location_accuracy": float(np.mean([s.location_accuracy for s in scores])),
        "characters_accuracy": float(np.mean([s.characters_accuracy for s in scores])),
        "character_recall": float(np.mean([s.character_recall for s in scores])),
        "character_recall_by_quarter": np.mean([s.character_recall_by_quarter for s in scores], 0).tolist(),
    }
    gen_b = np.concatenate([block_features(g["features"]) for g in gen])
    ref_b = np.concatenate([block_features(r["features"]) for r in ref])
    out["block_fd_16"] = frechet(gen_b, ref_b) if len(gen_b) > 2 and len(ref_b) > 2 else float("nan")
    out["avg_fd_by_quarter"] = [frechet(np.concatenate([quarter(g["features"], q) for g in gen]),
                                        np.concatenate([quarter(r["features"], q) for r in ref])) for q in range(4)]
    out.update(motion_summary(videos, prompts, version))
    out.update({f"real_{k}": v for k, v in motion_summary(references, prompts, version).items()})  # same captions
    if version == 2:
        out.update(coherence_summary(videos, prompts))
        out.update({f"real_{k}": v for k, v in coherence_summary(references, prompts).items()})
    out["story_version"] = version
    return out


def heldout_stories(count: int, num_frames: int, resolution: int, seed: int = 1000,
                    version: int = 1) -> list[LongVideo]:
    """Stories never trained on (training uses seed 0; the probe seed 5000)."""
    return [LongVideo(seed, i, num_frames, resolution, version) for i in range(count)]


def story_version_of(pipe) -> int:
    """The story version the pipeline's weights were trained on (1 where unknown: the bundled weights)."""
    return pipe.nets.spec.trained_on.story_version or 1


def evaluate_generation(pipe, num_frames: int, mode: str = "dod", depth: int | None = None, stories: int = 4,
                        steps: int | None = None, seed: int = 0, probe: FrameProbe | None = None,
                        progress: bool = True, guidance_scale: float | None = None, sampler: str | None = None) -> dict:
    """Generate `stories` held-out stories (their per-frame captions as prompts) with a pipeline and score them
    against the real renderings of the same stories (steps, sampler, guidance: None = what the weights recommend)."""
    recommended = pipe.nets.spec.sampling
    guidance_scale = recommended.guidance_scale if guidance_scale is None else guidance_scale
    steps = recommended.num_inference_steps if steps is None else steps
    sampler = recommended.sampler if sampler is None else sampler
    res, version = pipe.config.resolution, story_version_of(pipe)
    videos, prompts, refs = [], [], []
    for story in tqdm(heldout_stories(stories, num_frames, res, version=version), desc=f"{mode} {num_frames}f",
                      disable=not progress):
        caps = [story.caption(i) for i in range(num_frames)]
        out = pipe(caps, num_frames=num_frames, mode=mode, depth=depth, num_inference_steps=steps,
                   seed=seed + story.index, guidance_scale=guidance_scale, sampler=sampler, progress=False)
        videos.append(out.frames)
        prompts.append(caps)
        refs.append(story.clip(range(num_frames)))
    result = evaluate_videos(videos, prompts, refs, probe, version)
    result.update({"mode": mode, "num_frames": num_frames, "depth": depth, "steps": steps, "sampler": sampler,
                   "seed": seed, "guidance_scale": guidance_scale})
    return result


@torch.no_grad()
def evaluate_reference(pipe, num_frames: int, stories: int = 4, reconstruct: bool = True,
                       probe: FrameProbe | None = None) -> dict:
    """References for generation's scores: the same held-out stories' real frames (reconstruct=False: the probe's
    own accuracy) or their T-KLVAE reconstructions in consecutive clips of L frames (what the latent space can
    represent)."""
    L, dev = pipe.nets.spec.frames_per_call or pipe.config.frames_per_call, pipe.nets.spec.device
    videos, prompts, refs = [], [], []
    version = story_version_of(pipe)
    for story in heldout_stories(stories, num_frames, pipe.config.resolution, version=version):
        real = story.clip(range(num_frames))
        video = real
        if reconstruct:
            n = num_frames // L * L
            x = torch.from_numpy(real[:n]).to(dev).permute(0, 3, 1, 2).unflatten(0, (-1, L))
            x = x.to(pipe.nets.spec.dtype) / 127.5 - 1.0
            y = pipe.nets.decode_latents(pipe.nets.encode_frames(x)).flatten(0, 1).float()
            video = uint8_frames(y).cpu().numpy()
            real = real[:n]
        videos.append(video)
        prompts.append([story.caption(i) for i in range(len(video))])
        refs.append(real)
    result = evaluate_videos(videos, prompts, refs, probe, version)
    result.update({"mode": "vae" if reconstruct else "real", "num_frames": len(videos[0]), "depth": None})
    return result


def main() -> None:
    """Retrain a bundled probe and print its scores on held-out real frames."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nuwaxl.train.evaluate", description=main.__doc__)
    ap.add_argument("--story-version", type=int, choices=sorted(PROBE_FILES), default=1)
    version = ap.parse_args().story_version
    probe = train_probe(version=version)
    path = bundled_probe_path(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_probe(probe, path, torch.float32 if version == 1 else torch.float16)
    probe = load_probe(path)
    stories = heldout_stories(4, 400, PROBE_RES, version=version)
    vids = [s.clip(range(400)) for s in stories]
    caps = [[s.caption(i) for i in range(400)] for s in stories]
    print(json.dumps(evaluate_videos(vids, caps, vids, probe, version)))


if __name__ == "__main__":
    main()
