"""Data parallelism over the calls of each batch: two gloo processes on the CPU make the same video as one."""

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import KW as BASE
from conftest import STORY, frame_diff

from nuwaxl.runtime.distributed import leave, shard
from nuwaxl.runtime.pipeline import Pipeline

KW = {**BASE, "num_frames": 50, "depth": 2, "num_inference_steps": 3, "sampler": "ddpm"}


def test_shards_cover_every_call_once():
    for n in range(0, 12):
        for size in (1, 2, 3, 4):
            parts = [shard(n, r, size) for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# Eight ranks (the eight-GPU issue's layout, on the CPU): 120 frames of 8 per call, levels of 1, 3 and 17 calls, so
# level 2 spreads over 3 ranks and level 3 over all 8 (3 ranks take 3 calls, 5 take 2).
KW8 = {**BASE, "num_frames": 120, "frames_per_call": 8, "num_inference_steps": 2, "sampler": "ddpm"}


def _worker(rank: int, size: int, port: int, out: str, kw: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        video = Pipeline.from_preset("tiny", device="cpu")(STORY, **kw).frames
        if rank == 0:
            np.save(out, video)
        else:
            assert video is None  # only rank 0 emits frames
    except BaseException:
        leave(wait=False)  # no barrier: the other ranks may be inside a collective
        raise
    leave()


@pytest.mark.parametrize("size,kw", [(2, KW), (3, KW), (8, KW8)])
def test_data_parallel_video_equals_single_process(size, kw, tmp_path):
    with socket.socket() as s:  # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "video.npy")
    mp.spawn(_worker, args=(size, port, out, kw), nprocs=size, join=True)
    parallel = np.load(out)
    single = Pipeline.from_preset("tiny", device="cpu")(STORY, **kw).frames
    assert parallel.shape == single.shape == (kw["num_frames"], 32, 32, 3)
    assert frame_diff(parallel, single)[0] <= 1  # batch-size rounding only


def test_leave_waits_then_destroys_the_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    leave()
    assert not dist.is_initialized()
    leave()  # outside a group: nothing to do
