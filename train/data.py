"""A procedural long-video dataset in the spirit of FlintstonesHD (which was never released): cartoon stories
thousands of frames long, with a recurring cast, actions, locations, shot changes and a caption for every frame.

Everything is deterministic from (seed, story index) and rendered on the fly with numpy, so no dataset is stored.
Each frame also carries ground-truth labels (location, characters, their actions and positions), which the
evaluation uses for caption-attribute accuracy and character consistency.

Two versions of the stories (`STORY_VERSIONS`); the captions and shots are the same in both:
- 1: each character a flat shape of its cast colour sliding across the frame (what the bundled weights know);
- 2: legible motion and long-range state. A character is a figure a third of the frame high: a head of its cast
  colour (its identity) over a body, arms and legs in an outfit colour; walking swings the limbs. Three things
  the captions never mention but the labels carry, fixed for the story or advancing with it: each character's
  outfit colour (`Story.outfits`), a boulder that appears at a story event in one location and stays where it was
  left (`Story.boulder`), and the daylight, which fades from frame 0 to dusk over `DAY_FRAMES` frames.
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
STORY_VERSIONS = (1, 2)
# Version 2: outfit colours (distinct from the cast, the locations and the boulder), the boulder's colour, the
# daylight's pace (light 1.0 at frame 0, DUSK_LIGHT at DAY_FRAMES and after) and the walkers' gait period.
OUTFITS = ((40, 170, 70), (200, 20, 60), (20, 150, 160), (250, 130, 200))
BOULDER_COLOUR = (250, 215, 30)
DAY_FRAMES = 4096
DUSK_LIGHT = 0.5
GAIT_FRAMES = 12
WALK_SPEED = 0.004  # walkers move this fraction of the frame width per frame (0.26 px at 64 px)
JUMP, JUMP_V2 = 0.25, 0.15  # a jump's height (16-frame hops), versions 1 and 2


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
    positions: tuple[tuple[float, float], ...]  # (x, y) in [0, 1]: version 1 the body's centre, 2 the head's
    # version 2 only (None / 1.0 in version 1): each character's outfit (index into OUTFITS), the boulder's
    # position if it is in this frame, the daylight (sky and ground colours are scaled by it)
    outfits: tuple[int, ...] | None = None
    boulder: tuple[float, float] | None = None
    light: float = 1.0


@dataclass(frozen=True)
class Story:
    """A version-2 story's state that no caption mentions: an outfit per cast member for the whole story, and the
    boulder: from frame `boulder_from` on, it lies at x = `boulder_x` in location `boulder_location`."""

    outfits: tuple[int, ...]  # per CAST index
    boulder_from: int
    boulder_location: int
    boulder_x: float


def story_state(seed: int, index: int) -> Story:
    """Independent of the story's length, so a shorter rendering of a story is a prefix of a longer one."""
    rng = np.random.default_rng([seed, index, 2])
    return Story(tuple(int(o) for o in rng.integers(len(OUTFITS), size=len(CAST))), int(rng.integers(64, 1024)),
                 int(rng.integers(len(LOCATIONS))), float(rng.uniform(0.15, 0.85)))


def daylight(i: int) -> float:
    return 1.0 - (1.0 - DUSK_LIGHT) * min(i / DAY_FRAMES, 1.0)


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


BOULDER_Y = 0.84  # the boulder's centre: on the ground
HEAD = 0.075  # version-2 figure, in fractions of the frame: head radius (or half-width), body below it
BODY_W, BODY_H, LIMB = 0.07, 0.15, 0.13


def _segment(xx: np.ndarray, yy: np.ndarray, a: tuple[float, float], b: tuple[float, float],
             width: float) -> np.ndarray:
    """Pixels within `width` of the segment a-b."""
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    u = np.clip(((xx - ax) * dx + (yy - ay) * dy) / (dx * dx + dy * dy + 1e-12), 0, 1)
    return (xx - ax - u * dx) ** 2 + (yy - ay - u * dy) ** 2 <= width ** 2


def draw_figure(img: np.ndarray, xx: np.ndarray, yy: np.ndarray, head: tuple[float, float], cast, outfit, action: int,
                t: int) -> None:
    """A version-2 character: legs, body and arms in its outfit colour, then its head (cast colour and shape) with
    an eye; walkers swing their limbs with period GAIT_FRAMES, jumpers tuck their legs."""
    x, y = head
    _name, colour, shape = cast
    top, hip = y + HEAD, y + HEAD + BODY_H
    swing = 0.6 * np.sin(2 * np.pi * t / GAIT_FRAMES) if action in (1, 2) else 0.0
    spread = 0.25 if action == 3 else 0.12
    limbs = np.zeros(img.shape[:2], dtype=bool)
    for side in (-1, 1):
        angle = side * (spread + swing)  # legs swing opposite to each other, arms opposite to the legs
        limbs |= _segment(xx, yy, (x, hip), (x + LIMB * np.sin(angle), hip + LIMB * np.cos(angle)), 0.022)
        arm = -side * (0.35 + swing * 0.8)
        limbs |= _segment(xx, yy, (x, top + 0.02), (x + 0.11 * np.sin(arm), top + 0.02 + 0.11 * np.cos(arm)), 0.018)
    limbs |= (np.abs(xx - x) <= BODY_W / 2) & (yy >= top) & (yy <= hip)
    img[limbs] = outfit
    dx, dy = xx - x, yy - y
    if shape == "circle":
        face = dx**2 + dy**2 <= HEAD**2
    elif shape == "square":
        face = (np.abs(dx) <= HEAD * 0.9) & (np.abs(dy) <= HEAD * 0.9)
    else:  # triangle, apex up
        face = (dy <= HEAD) & (dy >= -HEAD) & (np.abs(dx) <= (dy + HEAD) / 2 + 0.01)
    img[face] = colour
    img[(xx - x) ** 2 + (yy - (y - HEAD / 3)) ** 2 <= (HEAD / 4) ** 2] = (0, 0, 0)


class LongVideo:
    """One procedural story: `frame(i)` (H, W, 3) uint8, `caption(i)`, `labels(i)`; len() frames; `version` one of
    STORY_VERSIONS."""

    def __init__(self, seed: int, index: int, num_frames: int, resolution: int = 64, version: int = 1):
        if resolution < 16:
            raise ValueError(f"resolution={resolution} must be at least 16 px")
        if version not in STORY_VERSIONS:
            raise ValueError(f"story version {version} is unknown; use one of {STORY_VERSIONS}")
        self.seed, self.index, self.num_frames, self.resolution = seed, index, num_frames, resolution
        self.version = version
        self.shots = story_shots(seed, index, num_frames)
        self.story = story_state(seed, index) if version == 2 else None

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
        v2 = self.version == 2
        for a in shot.actors:
            x, y = a.x0, 0.7 if not v2 else 0.47
            if a.action == 1:
                x = a.x0 - WALK_SPEED * t
            elif a.action == 2:
                x = a.x0 + WALK_SPEED * t
            elif a.action == 3:
                y -= (JUMP_V2 if v2 else JUMP) * abs(np.sin(np.pi * t / 16.0))
            x = 0.1 + (x - 0.1) % 0.8  # walkers wrap around inside the frame
            positions.append((float(x), float(y)))
        chars = tuple(a.character for a in shot.actors)
        extra = {}
        if v2:
            st = self.story
            here = shot.location == st.boulder_location and i >= st.boulder_from
            extra = {"outfits": tuple(st.outfits[c] for c in chars), "light": daylight(i),
                     "boulder": (st.boulder_x, BOULDER_Y) if here else None}
        return FrameLabels(shot.location, chars, tuple(a.action for a in shot.actors), tuple(positions), **extra)

    def frame(self, i: int) -> np.ndarray:
        lab, r = self.labels(i), self.resolution
        sky, ground = (np.array(c, dtype=np.float64) * lab.light for c in LOCATIONS[lab.location][1:])
        img = np.empty((r, r, 3), dtype=np.uint8)
        img[: int(0.75 * r)] = np.round(sky)
        img[int(0.75 * r):] = np.round(ground)
        yy, xx = np.mgrid[0:r, 0:r] / r
        if self.version == 2:
            if lab.boulder is not None:
                bx, by = lab.boulder
                img[(xx - bx) ** 2 + ((yy - by) * 1.6) ** 2 <= 0.07 ** 2] = BOULDER_COLOUR
            t = i - self.shot_of(i).start
            for c, a, o, pos in zip(lab.characters, lab.actions, lab.outfits, lab.positions, strict=True):
                draw_figure(img, xx, yy, pos, CAST[c], OUTFITS[o], a, t)
            return img
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
