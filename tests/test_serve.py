"""`trt-nuwaxl serve`: the HTTP API on the tiny preset, jobs in SQLite, workers whose steps are batched together."""

import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from conftest import STORY
from fastapi.testclient import TestClient
from PIL import Image

from benchmarks.serve_load import sse_events
from nuwaxl.errors import Cancelled, UserError
from nuwaxl.runtime.pipeline import Pipeline
from nuwaxl.runtime.video import read_mp4
from nuwaxl.serve import Server, create_app

REQUEST = {"prompts": STORY, "num_frames": 40, "frames_per_call": 8, "num_inference_steps": 4, "seed": 3}


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_preset("tiny", seed=0, device="cpu")


def wait_for(client, job_id, states=("done", "failed", "cancelled"), timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")


def test_a_job_gives_the_video_of_the_pipeline_alone(pipe, tmp_path):
    server = Server(pipe, tmp_path)
    try:
        client = TestClient(create_app(server))
        answer = client.post("/v1/videos", json=REQUEST)
        assert answer.status_code == 202
        job = wait_for(client, answer.json()["id"])
        assert job["state"] == "done" and job["frames_done"] == 40, job
        assert job["timings"]["first_frame_s"] is not None
        alone = pipe(STORY, progress=False, **{k: v for k, v in REQUEST.items() if k != "prompts"}).frames
        served = np.stack([np.asarray(Image.open(server.frame_path(job["id"], i))) for i in range(40)])
        png = client.get(f"/v1/videos/{job['id']}/frames/0.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert np.array_equal(served, alone)  # same seed, same frames, bit for bit
        mp4 = client.get(f"/v1/videos/{job['id']}.mp4")
        assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
        (tmp_path / "got.mp4").write_bytes(mp4.content)
        assert read_mp4(tmp_path / "got.mp4").shape[0] == 40
        metrics = client.get("/metrics").text
        assert "nuwaxl_frames_total 40.0" in metrics and 'nuwaxl_jobs_total{state="done"} 1.0' in metrics
        value = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("nuwaxl")}
        # 4 steps x 2 levels, one job: 8 merged calls, 7 periods between their starts; no GPU time on the CPU
        assert value["nuwaxl_step_jobs_count"] == 8 and value["nuwaxl_step_period_seconds_count"] == 7
        assert value["nuwaxl_step_period_seconds_sum"] > 0 and value["nuwaxl_step_gpu_seconds_count"] == 0
        assert client.get("/healthz").json() == {"ok": True, "workers": 4, "queue": 0}
    finally:
        server.stop()


def test_a_bad_request_is_422_with_the_pipelines_message(pipe, tmp_path):
    server = Server(pipe, tmp_path, start=False)
    client = TestClient(create_app(server))
    with pytest.raises(UserError) as direct:
        pipe.prepare(STORY, 40, num_inference_steps=0)
    answer = client.post("/v1/videos", json={**REQUEST, "num_inference_steps": 0})
    assert answer.status_code == 422 and answer.json()["detail"] == str(direct.value)
    assert client.post("/v1/videos", json={**REQUEST, "mode": "sideways"}).status_code == 422
    assert client.get("/v1/videos/nope").status_code == 404
    server.stop()


def test_a_full_queue_is_429_with_retry_after(pipe, tmp_path):
    server = Server(pipe, tmp_path, max_queue=2, start=False)  # no worker: accepted jobs stay queued
    client = TestClient(create_app(server))
    assert [client.post("/v1/videos", json=REQUEST).status_code for _ in range(2)] == [202, 202]
    full = client.post("/v1/videos", json=REQUEST)
    assert full.status_code == 429 and full.headers["retry-after"] == "5"
    server.stop()


def test_cancelling_a_queued_job(pipe, tmp_path):
    server = Server(pipe, tmp_path, start=False)
    client = TestClient(create_app(server))
    job_id = client.post("/v1/videos", json=REQUEST).json()["id"]
    assert client.delete(f"/v1/videos/{job_id}").json()["state"] == "cancelled"
    assert client.get(f"/v1/videos/{job_id}.mp4").status_code == 409
    assert server.queue == []
    server.stop()


def test_a_restarted_server_runs_the_jobs_it_had_accepted(pipe, tmp_path):
    first = Server(pipe, tmp_path, start=False)
    job_id = TestClient(create_app(first)).post("/v1/videos", json=REQUEST).json()["id"]
    first.stop()  # as if killed before the job ran: it is only in jobs.db
    second = Server(pipe, tmp_path)
    try:
        assert wait_for(TestClient(create_app(second)), job_id)["state"] == "done"
    finally:
        second.stop()


def start_server(data) -> tuple[subprocess.Popen, str]:
    """`trt-nuwaxl serve` (tiny preset, CPU) in a new process on a free port, once /healthz answers; as many torch
    threads as this process (conftest), so its videos match this process's bit for bit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nuwaxl.cli", "serve", "--preset", "tiny", "--device", "cpu",
                             "--port", str(port), "--data", str(data)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1",
                                 "OMP_NUM_THREADS": str(torch.get_num_threads())})
    url, end = f"http://127.0.0.1:{port}", time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                assert r.status == 200 and b'"ok":true' in r.read()
                return proc, url
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < end, "the server did not answer within 120 s"
            time.sleep(0.2)


def test_the_command_serves_http(tmp_path):
    """`trt-nuwaxl serve` on a real uvicorn server: /healthz answers over a socket."""
    proc, _ = start_server(tmp_path)
    proc.terminate()
    proc.wait(timeout=30)
    assert (tmp_path / "jobs.db").is_file()


def test_a_killed_server_resumes_its_job_from_the_last_finished_level(pipe, tmp_path):
    """SIGKILL mid-job, restart on the same data folder: the job ends with the video an uninterrupted run makes,
    and the restarted server ran only the levels after the last one saved."""
    import httpx

    request = {"prompts": ["a red fox runs"], "num_frames": 120, "frames_per_call": 8, "num_inference_steps": 20,
               "seed": 4}
    proc, url = start_server(tmp_path)
    try:
        job_id = httpx.post(f"{url}/v1/videos", json=request).json()["id"]
        end = time.time() + 120
        while httpx.get(f"{url}/v1/videos/{job_id}").json()["levels_done"] < 1:
            assert time.time() < end, "level 1 did not finish within 120 s"
            time.sleep(0.02)
    finally:
        proc.kill()  # no shutdown handler runs
        proc.wait(timeout=30)
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        state, levels_done = db.execute("SELECT state, levels_done FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert state == "running" and levels_done >= 1, (state, levels_done)
    proc, url = start_server(tmp_path)
    try:
        end = time.time() + 180
        while (job := httpx.get(f"{url}/v1/videos/{job_id}").json())["state"] in ("queued", "running"):
            assert time.time() < end, "the resumed job did not finish within 180 s"
            time.sleep(0.1)
        assert job["state"] == "done", job
        merged_steps = next(float(line.split()[-1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
                            if line.startswith("nuwaxl_step_jobs_count"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    plan = pipe.prepare(**request).plan
    assert merged_steps == 20 * (plan.depth - levels_done)  # one batch per level here; finished levels not rerun
    alone = pipe(progress=False, **request).frames
    served = np.stack([np.asarray(Image.open(tmp_path / job_id / f"{i:06d}.png")) for i in range(120)])
    assert np.array_equal(served, alone)
    assert not list((tmp_path / job_id).glob("level*.safetensors"))  # removed once the video is done


def test_cancelling_a_running_job_stops_it_at_the_next_step(pipe, tmp_path):
    server = Server(pipe, tmp_path)
    try:
        client = TestClient(create_app(server))
        long = {**REQUEST, "num_frames": 226, "frames_per_call": 16, "num_inference_steps": 200}  # minutes alone
        job_id = client.post("/v1/videos", json=long).json()["id"]
        wait_for(client, job_id, states=("running",))
        t0 = time.time()
        assert client.delete(f"/v1/videos/{job_id}").status_code == 200
        job = wait_for(client, job_id, timeout=30)
        assert job["state"] == "cancelled" and job["frames_done"] < 226, job
        assert time.time() - t0 < 10  # a step of the tiny preset is milliseconds
    finally:
        server.stop()


def test_the_pipeline_stops_after_the_step_in_which_it_is_asked_to(pipe):
    asked = []
    cancel = lambda: asked.append(1) or len(asked) == 3  # noqa: E731  (True after the third step)
    with pytest.raises(Cancelled):
        list(pipe.iter_frames(STORY, 40, frames_per_call=8, num_inference_steps=4, progress=False, cancel=cancel))
    assert len(asked) == 3


def test_a_short_job_submitted_after_a_long_one_finishes_first(pipe, tmp_path):
    """Fairness: running jobs share every denoising step (continuous batching), so a short job does not wait for
    a long one that came before it; with one job at a time (max_active=1) it would."""
    order = {}
    for active in (1, 2):
        server = Server(pipe, tmp_path / str(active), max_active=active)
        try:
            client = TestClient(create_app(server))
            long = client.post("/v1/videos", json=dict(REQUEST, num_frames=120, num_inference_steps=8)).json()["id"]
            wait_for(client, long, states=("running",))
            short = client.post("/v1/videos", json=dict(REQUEST, num_frames=8, num_inference_steps=2)).json()["id"]
            jobs = {name: wait_for(client, i) for name, i in (("long", long), ("short", short))}
            assert all(j["state"] == "done" for j in jobs.values()), jobs
            order[active] = sorted(jobs, key=lambda n: jobs[n]["timings"]["finished"])
            metrics = client.get("/metrics").text
        finally:
            server.stop()
    assert order == {1: ["long", "short"], 2: ["short", "long"]}
    assert "nuwaxl_step_jobs_bucket" in metrics


def test_the_event_stream_gives_every_frame_in_order_then_the_end(pipe, tmp_path):
    server = Server(pipe, tmp_path)
    try:
        client = TestClient(create_app(server))
        job_id = client.post("/v1/videos", json=REQUEST).json()["id"]
        with client.stream("GET", f"/v1/videos/{job_id}/events") as answer:
            assert answer.headers["content-type"].startswith("text/event-stream")
            events = list(sse_events(answer.iter_lines()))
        frames = [data for name, data in events if name == "frame"]
        assert [f["index"] for f in frames] == list(range(40))
        assert client.get(frames[0]["url"]).status_code == 200  # announced only once the file exists
        assert events[-1] == ("end", {"state": "done", "error": None, "video": f"/v1/videos/{job_id}.mp4"})
        assert client.get("/v1/videos/nope/events").status_code == 404
    finally:
        server.stop()


def test_the_page_is_served(pipe, tmp_path):
    server = Server(pipe, tmp_path, start=False)
    page = TestClient(create_app(server)).get("/")
    assert page.status_code == 200 and "EventSource" in page.text
    server.stop()


def test_frames_are_written_off_the_job_thread_and_announced_in_order_once_on_disk(tmp_path):
    """FrameOutput: PNG threads finish out of order (frame 0 is the slowest), yet a frame is announced only when it
    and every earlier one exist; `finish` waits for all of them and the mp4."""
    from concurrent.futures import ThreadPoolExecutor

    from nuwaxl.serve import FrameOutput

    announced = []

    def path(i):
        if i == 0:
            time.sleep(0.3)
        return tmp_path / f"{i}.png"

    def on_written(count):
        assert all((tmp_path / f"{i}.png").exists() for i in range(count))
        announced.append(count)

    frames = [np.full((16, 16, 3), 10 * i, np.uint8) for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        out = FrameOutput(pool, path, tmp_path / "v.mp4", on_written)
        t0 = time.perf_counter()
        for i, f in enumerate(frames):
            out.put(i, f)
        handed_over = time.perf_counter() - t0
        out.finish()
    assert handed_over < 0.2  # the slow write did not hold up the caller
    assert announced == [12]  # frames 1-11 waited for frame 0, then came out together
    assert read_mp4(tmp_path / "v.mp4").shape[0] == 12


def test_an_aborted_frame_output_leaves_no_video(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from nuwaxl.serve import FrameOutput

    with ThreadPoolExecutor(2) as pool:
        out = FrameOutput(pool, lambda i: tmp_path / f"{i}.png", tmp_path / "v.mp4", lambda count: None)
        for i in range(3):
            out.put(i, np.zeros((16, 16, 3), np.uint8))
        out.abort()
    assert not (tmp_path / "v.mp4").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".mp4" or "partial" in p.name]
