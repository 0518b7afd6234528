"""Sparse hierarchical sampling of training clips from long videos (paper section 3.3).

The MTD is trained directly on long videos: a global sample takes L frames at the coarsest stride (L-1)^(m-1) with
an all-zero visual condition; a local sample of level k takes L frames at stride (L-1)^(m-k) from a segment of the
level above, with its first and last frames as the condition. These are exactly the calls the planner makes at
inference (`nuwaxl.runtime.planner`), so training and generation see the same grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nuwaxl.config import check_frames_per_call
from nuwaxl.runtime.planner import level_stride, max_frames


@dataclass(frozen=True)
class TrainingClip:
    level: int  # 1 = global
    positions: tuple[int, ...]  # L frame indices into the long video
    cond_slots: tuple[int, ...]  # slots whose frames are the visual condition: () global, (0, L-1) local
    origin: int = 0  # first frame of the tree the clip was drawn from


def sample_clip(video_frames: int, frames_per_call: int, depth: int, rng: np.random.Generator,
                level: int | None = None) -> TrainingClip:
    """One training clip; the level is uniform over 1..depth unless given. The tree starts at a random offset so
    every frame of a long video can be used."""
    L, m = frames_per_call, depth
    check_frames_per_call(L)
    if m < 1:
        raise ValueError(f"depth={m} must be at least 1")
    span = max_frames(L, m)
    if video_frames < span:
        raise ValueError(f"a video of {video_frames} frames is shorter than one tree of L={L}, depth={m} "
                         f"({span} frames); use a longer video, a smaller depth or smaller L")
    level = int(rng.integers(1, m + 1)) if level is None else level
    if not 1 <= level <= m:
        raise ValueError(f"level={level} must be between 1 and depth={m}")
    origin = int(rng.integers(0, video_frames - span + 1))
    stride = level_stride(L, m, level)
    segments = (L - 1) ** (level - 1)  # segments of this level in one tree
    start = origin + int(rng.integers(segments)) * stride * (L - 1)
    positions = tuple(start + stride * i for i in range(L))
    return TrainingClip(level, positions, () if level == 1 else (0, L - 1), origin)
