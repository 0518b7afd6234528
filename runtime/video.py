"""Video and picture outputs: mp4 through PyAV (FFmpeg), a PNG sheet of the keyframe tree through Pillow.

Every writer goes through `nuwaxl.files.atomic_output`, so a failed run never leaves a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from nuwaxl.errors import UserError
from nuwaxl.files import atomic_output
from nuwaxl.runtime.planner import Plan

# libx264's speed/size trade-off. Measured on 1024 frames at 128 px (our 2-core machine, crf 18): rendered frames
# medium 0.55 s / 149 KiB, veryfast 0.40 s / 158 KiB; the same with noise (what random weights make) 2.28 s / 6.6 MiB
# against 0.87 s / 5.9 MiB. The server encodes while a user waits for the end of the video.
X264_PRESET = "veryfast"


def check_writable(path: str | os.PathLike, suffix: str, flag: str = "the output path") -> Path:
    """Fail before any generation work if the output cannot be written; `flag` names the option that set it."""
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise UserError(f"{flag} {path} must end in {suffix}")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name such as {path / ('video' + suffix)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: folder {parent} does not exist; create it or choose another {flag}")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose a writable {flag}") from None
    return path


def write_mp4(frames: Iterable[np.ndarray], path: str | os.PathLike, fps: int = 8, crf: int = 18,
              preset: str = X264_PRESET) -> int:
    """Encode (H, W, 3) uint8 frames as H.264 in yuv420p; returns the number of frames written.

    `frames` may be a generator (e.g. Pipeline.iter_frames), so encoding overlaps generation.
    """
    count = 0
    with atomic_output(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = None
            for frame in frames:
                if stream is None:
                    h, w = frame.shape[:2]
                    stream = container.add_stream("libx264", rate=Fraction(fps))
                    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                    stream.options = {"crf": str(crf), "preset": preset}
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
                count += 1
            if stream is None:
                raise ValueError("no frames to write")
            for packet in stream.encode():
                container.mux(packet)
    return count


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video as (N, H, W, 3) uint8 (for tests and evaluation)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def sheet_rows(plan: Plan, max_per_row: int = 16) -> list[tuple[int, list[int]]]:
    """(level, frame indices shown) per level: the frames that level generated, evenly sampled if many."""
    producer = plan.producer()
    rows = []
    for level in range(1, len(plan.levels) + 1):
        idx = sorted(p for p, c in producer.items() if c.level == level and p < plan.num_frames)
        if len(idx) > max_per_row:
            idx = [idx[round(i * (len(idx) - 1) / (max_per_row - 1))] for i in range(max_per_row)]
        rows.append((level, idx))
    return rows


def tree_sheet(frames: dict[int, np.ndarray], plan: Plan, max_per_row: int = 16, thumb: int = 64) -> Image.Image:
    """One row per level of the plan, each frame labelled with its index; `frames` needs only those shown."""
    rows = sheet_rows(plan, max_per_row)
    label_w, label_h = 56, 12
    sheet = Image.new("RGB", (label_w + max_per_row * thumb, len(rows) * (thumb + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (level, idx) in enumerate(rows):
        y = r * (thumb + label_h)
        draw.text((2, y + thumb // 2), f"level {level}", fill="black")
        for k, pos in enumerate(idx):
            x = label_w + k * thumb
            sheet.paste(Image.fromarray(frames[pos]).resize((thumb, thumb), Image.NEAREST), (x, y))
            draw.text((x + 2, y + thumb), str(pos), fill="black")
    return sheet


def write_png(image: Image.Image, path: str | os.PathLike) -> None:
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")
