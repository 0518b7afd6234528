"""The procedural long-video dataset and the sparse hierarchical sampling of training clips (training issue)."""

import numpy as np
import pytest

from nuwaxl.runtime.planner import max_frames, plan_dod
from nuwaxl.train.data import ACTIONS, CAST, LOCATIONS, LongVideo, story_shots
from nuwaxl.train.sampling import sample_clip


def test_stories_are_deterministic_and_differ_by_seed_and_index():
    a, b = LongVideo(0, 3, 400, 32), LongVideo(0, 3, 400, 32)
    assert a.shots == b.shots and [a.caption(i) for i in range(400)] == [b.caption(i) for i in range(400)]
    assert np.array_equal(a.clip(range(0, 400, 37)), b.clip(range(0, 400, 37)))
    assert LongVideo(1, 3, 400, 32).shots != a.shots and LongVideo(0, 4, 400, 32).shots != a.shots


def test_long_story_has_shot_changes_recurring_cast_and_a_caption_per_frame():
    video = LongVideo(7, 0, 3376, 32)
    shots = video.shots
    assert sum(s.length for s in shots) == 3376 and shots[0].start == 0
    assert all(b.start == a.start + a.length for a, b in zip(shots, shots[1:], strict=False))
    assert len(shots) >= 20 and all(a.location != b.location for a, b in zip(shots, shots[1:], strict=False))
    appearances = [sum(c in {x.character for x in s.actors} for s in shots) for c in range(len(CAST))]
    assert min(appearances) >= 2  # every character recurs across shots
    for i in (0, 1000, 3375):
        lab, cap = video.labels(i), video.caption(i)
        assert LOCATIONS[lab.location][0] in cap
        assert all(CAST[c][0] in cap for c in lab.characters) and all(ACTIONS[a] in cap for a in lab.actions)
    with pytest.raises(IndexError, match="frame 3376 is outside 0..3375"):
        video.caption(3376)


def test_frames_show_the_labels():
    video = LongVideo(2, 1, 300, 64)
    shot = next(s for s in video.shots if any(a.action in (1, 2) for a in s.actors) and s.length > 20)
    first, later = video.frame(shot.start), video.frame(shot.start + 20)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert not np.array_equal(first, later)  # walkers move
    lab = video.labels(shot.start)
    x, y = lab.positions[-1]  # the last character drawn is on top: its body colour is at its centre
    assert tuple(first[int(y * 64), int(x * 64)]) == CAST[lab.characters[-1]][1]
    sky = LOCATIONS[lab.location][1]
    assert tuple(first[1, 1]) == sky  # the location's sky in the corner


def test_bad_story_arguments_name_the_fix():
    with pytest.raises(ValueError, match="num_frames=0 must be at least 1"):
        story_shots(0, 0, 0)
    with pytest.raises(ValueError, match="resolution=8 must be at least 16"):
        LongVideo(0, 0, 10, 8)


@pytest.mark.parametrize("L,m", [(4, 2), (16, 3), (5, 1)])
def test_training_clips_lie_on_the_planners_grids(L, m):
    """Global clips: L frames at the coarsest stride, no condition; local clips of level k: the frames of one
    inference call of level k (same stride, segment aligned to the level above), first and last as condition."""
    rng = np.random.default_rng(0)
    n = max_frames(L, m) + 37
    plan = plan_dod(max_frames(L, m), L, m)
    calls = {(c.level, c.positions, c.cond_slots) for c in plan.calls}
    levels = set()
    for _ in range(300):
        clip = sample_clip(n, L, m, rng)
        levels.add(clip.level)
        assert 0 <= clip.origin <= 37  # the tree lies inside the video
        # Shifted back by its tree's origin, the clip is exactly one call of the planner's tree: same level,
        # same frames (so a clip misaligned by even one frame fails), same condition slots.
        assert (clip.level, tuple(p - clip.origin for p in clip.positions), clip.cond_slots) in calls
    assert levels == set(range(1, m + 1))


def test_clip_sampling_errors_name_the_fix():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="shorter than one tree of L=16, depth=3 \\(3376 frames\\)"):
        sample_clip(1000, 16, 3, rng)
    with pytest.raises(ValueError, match="level=4 must be between 1 and depth=3"):
        sample_clip(4000, 16, 3, rng, level=4)


def test_version_2_stories_keep_the_captions_and_add_unmentioned_state():
    """Version 2 changes the pictures, not the story: the same shots and captions; each character keeps one outfit
    for the whole story, the boulder lies in one place from its event on, the daylight fades with the frame index,
    and a shorter rendering is a prefix of a longer one. Version 1 renders as before."""
    from nuwaxl.train.data import BOULDER_COLOUR, OUTFITS, LongVideo, daylight

    v1, v2 = LongVideo(0, 2, 1400, 64), LongVideo(0, 2, 1400, 64, version=2)
    assert v1.shots == v2.shots and all(v1.caption(i) == v2.caption(i) for i in range(0, 1400, 7))
    st = v2.story
    outfits = {}
    for i in range(1400):
        lab = v2.labels(i)
        for c, o in zip(lab.characters, lab.outfits, strict=True):
            assert outfits.setdefault(c, o) == o == st.outfits[c]
        assert lab.light == daylight(i) and lab.light <= 1.0
        assert (lab.boulder is not None) == (i >= st.boulder_from and lab.location == st.boulder_location)
    assert daylight(1399) < daylight(0) - 0.15
    shown = [i for i in range(1400) if v2.labels(i).boulder is not None]
    assert shown, "this story shows its boulder"
    frame = v2.frame(shown[0])
    assert (frame == BOULDER_COLOUR).all(-1).sum() > 20 and not (v2.frame(0) == BOULDER_COLOUR).all(-1).any()
    lab = v2.labels(100)
    assert (v2.frame(100) == OUTFITS[lab.outfits[0]]).all(-1).sum() > 40  # body and limbs in the outfit
    assert np.array_equal(LongVideo(0, 2, 300, 64, version=2).frame(250), v2.frame(250))  # length-independent
    assert not np.array_equal(v1.frame(100), v2.frame(100))
    with pytest.raises(ValueError, match="story version 3 is unknown; use one of \\(1, 2\\)"):
        LongVideo(0, 0, 10, 32, version=3)


def test_version_2_walkers_move_their_limbs():
    """A walker's legs swing: its figure changes shape between frames half a gait apart even where its head has
    moved less than a pixel, while a standing character's figure does not change at all."""
    from nuwaxl.train.data import GAIT_FRAMES, OUTFITS, LongVideo

    video = LongVideo(2, 1, 3000, 64, version=2)
    for action, changes in ((1, True), (2, True), (0, False)):
        shot = next(s for s in video.shots if len(s.actors) == 1 and s.actors[0].action == action
                    and s.length > GAIT_FRAMES)
        lab = video.labels(shot.start)
        colour = OUTFITS[lab.outfits[0]]
        a = (video.frame(shot.start + 3) == colour).all(-1)
        b = (video.frame(shot.start + 3 + GAIT_FRAMES // 2) == colour).all(-1)
        assert (a != b).sum() > 5 if changes else (a == b).all(), action
