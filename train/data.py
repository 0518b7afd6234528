"""A procedural long-video dataset in the spirit of FlintstonesHD (which was never released): cartoon stories
thousands of frames long, with a recurring cast, actions, locations, shot changes and a caption for every frame.

Everything is deterministic from (seed, story index) and rendered on the fly with numpy, so no dataset is stored.
Each frame also carries ground-truth labels (location, characters, their actions and positions), which the
evaluation uses for caption-attribute accuracy and character consistency.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

# The cast recurs in every story: name, body colour (RGB), shape.
CAST = (("Fred", (230, 90, 40), "square"), ("Wilma", (240, 240, 240), "circle"),
        ("Barney", (140, 90, 40), "triangle"), ("Dino", (150, 80, 200), "circle"),
        ("Betty", (40, 90, 220), "square"))
LOCATIONS = (("stone house", (150, 120, 90), (110, 90, 70)), ("yard", (120, 190, 240), (70, 160, 60)),
             ("volcano", (240, 150, 90), (120, 60, 40)), ("campfire at night", (20, 25, 70), (50, 40, 40)),
             ("quarry", (200, 200, 180), (160, 150, 120)))
ACTIONS = ("stands", "walks to the left", "walks to the right", "jumps")


@dataclass(frozen=True)
class Actor:
    character: int  # index into CAST
    action: int  # index into ACTIONS
    x0: float  # horizontal position at the start of the shot, in [0, 1]


@dataclass(frozen=True)
class Shot:
    start: int  # first frame
    length: int
    location: int  # index into LOCATIONS
    actors: tuple[Actor, ...]


@dataclass(frozen=True)
class FrameLabels:
    location: int
    characters: tuple[int, ...]
    actions: tuple[int, ...]
    positions: tuple[tuple[float, float], ...]  # (x, y) centres in [0, 1]


def story_shots(seed: int, index: int, num_frames: int, min_shot: int = 24, max_shot: int = 160) -> tuple[Shot, ...]:
    """The shots of story `index` under `seed`: lengths, locations, who is on screen doing what."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be at least 1")
    if not 1 <= min_shot <= max_shot:
        raise ValueError(f"shot lengths [{min_shot}, {max_shot}] must satisfy 1 <= min <= max")
    rng = np.random.default_rng([seed, index])
    shots, start, location = [], 0, int(rng.integers(len(LOCATIONS)))
    while start < num_frames:
        length = min(int(rng.integers(min_shot, max_shot + 1)), num_frames - start)
        if shots:  # a shot change moves to another location
            location = int((location + rng.integers(1, len(LOCATIONS))) % len(LOCATIONS))
        who = rng.choice(len(CAST), size=int(rng.integers(1, 3)), replace=False)
        actors = tuple(Actor(int(c), int(rng.integers(len(ACTIONS))), float(rng.uniform(0.2, 0.8))) for c in who)
        shots.append(Shot(start, length, location, actors))
        start += length
    return tuple(shots)


def _caption(location: int, actors: tuple[Actor, ...]) -> str:
    parts = [f"{CAST[a.character][0]} {ACTIONS[a.action]}" for a in actors]
    return f"{' and '.join(parts)} in the {LOCATIONS[location][0]}"


class LongVideo:
    """One procedural story: `frame(i)` (H, W, 3) uint8, `caption(i)`, `labels(i)`; len() frames."""

    def __init__(self, seed: int, index: int, num_frames: int, resolution: int = 64):
        if resolution < 16:
            raise ValueError(f"resolution={resolution} must be at least 16 px")
        self.seed, self.index, self.num_frames, self.resolution = seed, index, num_frames, resolution
        self.shots = story_shots(seed, index, num_frames)

    def __len__(self) -> int:
        return self.num_frames

    @cached_property
    def _shot_starts(self) -> np.ndarray:
        return np.array([s.start for s in self.shots])

    def shot_of(self, i: int) -> Shot:
        if not 0 <= i < self.num_frames:
            raise IndexError(f"frame {i} is outside 0..{self.num_frames - 1}")
        return self.shots[int(np.searchsorted(self._shot_starts, i, side="right")) - 1]

    def caption(self, i: int) -> str:
        shot = self.shot_of(i)
        return _caption(shot.location, shot.actors)

    def labels(self, i: int) -> FrameLabels:
        shot = self.shot_of(i)
        t = i - shot.start
        positions = []
        for a in shot.actors:
            x, y = a.x0, 0.7
            if a.action == 1:
                x = a.x0 - 0.004 * t
            elif a.action == 2:
                x = a.x0 + 0.004 * t
            elif a.action == 3:
                y = 0.7 - 0.25 * abs(np.sin(np.pi * t / 16.0))
            x = 0.1 + (x - 0.1) % 0.8  # walkers wrap around inside the frame
            positions.append((float(x), float(y)))
        return FrameLabels(shot.location, tuple(a.character for a in shot.actors),
                           tuple(a.action for a in shot.actors), tuple(positions))

    def frame(self, i: int) -> np.ndarray:
        lab, r = self.labels(i), self.resolution
        sky, ground = LOCATIONS[lab.location][1:]
        img = np.empty((r, r, 3), dtype=np.uint8)
        img[: int(0.75 * r)] = sky
        img[int(0.75 * r):] = ground
        yy, xx = np.mgrid[0:r, 0:r] / r
        size = 0.09
        for c, (x, y) in zip(lab.characters, lab.positions, strict=True):
            colour, shape = CAST[c][1], CAST[c][2]
            dx, dy = xx - x, yy - y
            if shape == "circle":
                body = dx**2 + dy**2 <= size**2
            elif shape == "square":
                body = (np.abs(dx) <= size) & (np.abs(dy) <= size)
            else:  # triangle, apex up
                body = (dy <= size) & (dy >= -size) & (np.abs(dx) <= (dy + size) / 2)
            img[body] = colour
            eye = (xx - x) ** 2 + (yy - (y - size / 2)) ** 2 <= (size / 4) ** 2
            img[eye] = (0, 0, 0)
        return img

    def clip(self, positions) -> np.ndarray:
        """(len(positions), H, W, 3) uint8."""
        return np.stack([self.frame(int(p)) for p in positions])
