"""Training corpora: the procedural stories or a user's own videos with a caption for every frame.

A corpus is a list of long videos held in memory as uint8 frames (N, H, W, 3) at the model's resolution, with one
caption per frame. A user's corpus is a folder of video files plus a captions file, either

- JSON: {"clip.mp4": ["caption of frame 0", "caption of frame 1", ...], ...}, or
- CSV with a header `video,frame,caption` (one row per frame; frames numbered from 0).

Every video needs exactly one caption per frame; each problem is reported with the file, the frame and the fix.
"""

from __future__ import annotations

import csv
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nuwaxl.errors import UserError
from nuwaxl.train.data import LongVideo

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


@dataclass
class CorpusVideo:
    name: str
    frames: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str]  # one per frame
    story_version: int | None = None  # procedural stories: their version (nuwaxl.train.data); None: a user's video

    def __len__(self) -> int:
        return len(self.frames)


def _render(args) -> CorpusVideo:
    seed, index, num_frames, resolution, version = args
    video = LongVideo(seed, index, num_frames, resolution, version)
    frames = video.clip(range(num_frames))
    return CorpusVideo(f"story-{seed}-{index}", frames, [video.caption(i) for i in range(num_frames)], version)


def synthetic_corpus(seed: int, stories: int, num_frames: int, resolution: int, workers: int = 1,
                     first: int = 0, version: int = 1) -> list[CorpusVideo]:
    """Stories `first .. first+stories-1` of `seed` in story `version`, rendered (in `workers` processes)."""
    jobs = [(seed, first + i, num_frames, resolution, version) for i in range(stories)]
    if workers <= 1:
        return [_render(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_render, jobs))


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """video file name -> per-frame captions, from JSON or CSV (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"captions file not found: {path}; give a .json or .csv with one caption per frame")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); expected {{\"video.mp4\": [captions...]}}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} must hold an object mapping video file names to lists of captions")
        for name, caps in data.items():
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise UserError(f"{path}: captions of {name!r} must be a list of strings, one per frame")
        return data
    if path.suffix.lower() == ".csv":
        rows: dict[str, dict[int, str]] = {}
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"video", "frame", "caption"} <= set(reader.fieldnames):
                raise UserError(f"{path} needs a header row with the columns video,frame,caption "
                                f"(found {reader.fieldnames})")
            for line, row in enumerate(reader, start=2):
                try:
                    frame = int(row["frame"])
                except (TypeError, ValueError):
                    raise UserError(f"{path} line {line}: frame {row['frame']!r} is not an integer") from None
                per_video = rows.setdefault(row["video"], {})
                if frame in per_video:
                    raise UserError(f"{path} line {line}: frame {frame} of {row['video']} has a second caption")
                per_video[frame] = row["caption"]
        out = {}
        for name, by_frame in rows.items():
            missing = sorted(set(range(max(by_frame) + 1)) - set(by_frame))
            if missing or min(by_frame) < 0:
                raise UserError(f"{path}: {name} lacks captions for frames {missing[:10]}; frames are numbered "
                                "from 0 and each needs one row")
            out[name] = [by_frame[i] for i in range(len(by_frame))]
        return out
    raise UserError(f"captions file {path} must end in .json or .csv")


def read_video(path: Path, resolution: int) -> np.ndarray:
    """(N, resolution, resolution, 3) uint8: the frames centre-cropped to a square and resized."""
    import av  # PyAV (FFmpeg) and Pillow: needed for user videos only
    from PIL import Image

    try:
        with av.open(str(path)) as container:
            frames = [f.to_image() for f in container.decode(video=0)]
    except (av.error.FFmpegError, OSError) as e:
        raise UserError(f"cannot decode {path} ({e}); re-encode it, e.g. as H.264 mp4") from None
    out = []
    for img in frames:
        w, h = img.size
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        out.append(np.asarray(img.convert("RGB").crop(box).resize((resolution, resolution), Image.BICUBIC)))
    return np.stack(out) if out else np.zeros((0, resolution, resolution, 3), np.uint8)


def folder_corpus(folder: str | Path, captions: str | Path, resolution: int) -> list[CorpusVideo]:
    """A user's videos: every video file in `folder` with its per-frame captions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"video folder not found: {folder}")
    caps = read_captions(captions)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise UserError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) in {folder}")
    uncaptioned = [p.name for p in files if p.name not in caps]
    if uncaptioned:
        raise UserError(f"no captions for {uncaptioned[:5]} in {captions}; add them or move those videos out")
    absent = sorted(set(caps) - {p.name for p in files})
    if absent:
        raise UserError(f"{captions} has captions for {absent[:5]}, which are not in {folder}")
    corpus = []
    for p in files:
        frames = read_video(p, resolution)
        if len(frames) != len(caps[p.name]):
            raise UserError(f"{p.name} has {len(frames)} frames but {len(caps[p.name])} captions in {captions}; "
                            "give exactly one caption per frame")
        corpus.append(CorpusVideo(p.name, frames, caps[p.name]))
    return corpus
