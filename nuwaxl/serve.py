"""`trt-nuwaxl serve`: one process that keeps a pipeline (engines or live modules) warm behind an HTTP API.

The HTTP layer (FastAPI on uvicorn), the job records in SQLite, and `max_active` worker threads that take accepted
jobs in the order they came and run them at once on one `runtime.batching.SharedNetworks`: the denoising steps of
all running jobs are merged into one model call per step (continuous batching: a short job joins a long one's steps
instead of waiting for it to end). A cancelled job stops after its current denoising step. Each level a job finishes
(but the last) is saved (`DATA/JOB/levelN.safetensors`, the frames' pixels as the pipeline made them) and counted in
the database: a restarted server resumes the job from its last finished level, and the video is the one an
uninterrupted run makes (`Pipeline.run(finished=...)`).

    GET    /                          a web page: type a story, watch frames arrive, download the mp4
    POST   /v1/videos                 {"prompts": [...], "num_frames": 40, ...} -> 202 {"id": ...}; 422: the reason
    GET    /v1/videos/{id}            state, frames done, timings
    GET    /v1/videos/{id}/events     Server-Sent Events: `frame` {"index", "url"} per final frame in temporal order,
                                      then `end` {"state", "error", "video"}; a browser's EventSource reads it
    GET    /v1/videos/{id}/frames/{n}.png   a frame, once final (frames become final in temporal order)
    GET    /v1/videos/{id}.mp4        the video, once done
    DELETE /v1/videos/{id}            cancel
    GET    /healthz, /metrics         liveness; Prometheus text (queue depth, jobs, frames, time to first frame)
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sqlite3
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, HTTPException, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from nuwaxl.config import SamplerName
from nuwaxl.errors import Cancelled, UserError
from nuwaxl.files import atomic_output
from nuwaxl.runtime.batching import MergedCall, SharedNetworks
from nuwaxl.runtime.video import write_mp4

STATES = ("queued", "running", "done", "failed", "cancelled")
UNFINISHED = ("queued", "running")
RETRY_AFTER_S = 5  # what a client told "queue full" waits before asking again
EVENTS_POLL_S = 0.01  # how often a frame stream looks at its job's progress (in memory: no database query)
# A job's progress goes to the database at most this often (and when it ends); streams and status read it from memory.
# Per frame, a commit cost 0.4 ms of the 5.2 s a 1024-frame job spent on its frames (128 px, our 2-core machine).
PROGRESS_DB_S = 0.5
# Threads that encode and write frames, shared by all jobs (Pillow's PNG encoder runs without the GIL: 128 px noise
# frames, our 2-core machine, 1.52 ms each on one thread, 0.85 ms per frame on two). With 4 on an H200 host (16 cores),
# 4 concurrent 1024-frame jobs announced their last frames 4.5 s after the GPU had finished
# (benchmarks/results/serve-trace-paper-1024f-engines-grouped-h200.json): one writer per core, up to 16.
PNG_WRITERS = min(16, os.cpu_count() or 1)


class VideoRequest(BaseModel):
    """What a client asks for; the pipeline's own checks (`Pipeline.prepare`) decide what is valid."""

    prompts: list[str] = Field(min_length=1, description="one prompt per keyframe, or one for the whole video")
    num_frames: int = 40
    num_inference_steps: int | None = None  # None: what the weights recommend (as sampler and guidance_scale)
    sampler: SamplerName | None = None
    seed: int = 0
    guidance_scale: float | None = None
    frames_per_call: int | None = None
    mode: Literal["dod", "ar"] = "dod"
    order: Literal["level", "depth"] = "level"

    def pipeline_kwargs(self) -> dict:
        return self.model_dump(exclude={"prompts", "num_frames"}, exclude_none=True)


class JobStore:
    """Accepted jobs in SQLite (`DATA/jobs.db`): a job is recorded before the client hears 202, so a restarted
    server finds every job it accepted."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)  # autocommit
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, request TEXT NOT NULL, "
                        "state TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL, "
                        "frames_done INTEGER NOT NULL DEFAULT 0, first_frame_s REAL, error TEXT, "
                        "levels_done INTEGER NOT NULL DEFAULT 0)")
        if "levels_done" not in {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}:  # an older server's
            self.db.execute("ALTER TABLE jobs ADD COLUMN levels_done INTEGER NOT NULL DEFAULT 0")

    def add(self, job_id: str, request: VideoRequest) -> None:
        with self.lock:
            self.db.execute("INSERT INTO jobs (id, request, state, created) VALUES (?, ?, 'queued', ?)",
                            (job_id, request.model_dump_json(), time.time()))

    def update(self, job_id: str, **fields) -> None:
        names = ", ".join(f"{k} = ?" for k in fields)
        with self.lock:
            self.db.execute(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: str) -> dict | None:
        with self.lock:
            cur = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
            row = cur.fetchone()
            return dict(zip([c[0] for c in cur.description], row, strict=True)) if row else None

    def unfinished(self) -> list[str]:
        """Jobs accepted but not finished, oldest first (a restarted server runs them again)."""
        with self.lock:
            marks = ",".join("?" * len(UNFINISHED))
            return [r[0] for r in self.db.execute(f"SELECT id FROM jobs WHERE state IN ({marks}) ORDER BY created",
                                                  UNFINISHED)]


class FrameOutput:
    """Where a running job's frames go, off the thread that drives the GPU: PNG files (`PNG_WRITERS` threads shared
    by all jobs) and the mp4 (encoded as frames arrive, in its own thread). A frame is announced (`on_written`,
    in temporal order) once its file exists. Measured with frames handed over at once (1024 frames, 128 px, our
    2-core machine): the job thread spent 5.2 s writing them itself (PNG 1.9 s, H.264 2.7 s, database 0.4 s)."""

    _END, _ABORT = object(), object()

    def __init__(self, pool: ThreadPoolExecutor, frame_path, video_path: Path, on_written):
        self.pool, self.frame_path, self.on_written = pool, frame_path, on_written
        self.lock = threading.Lock()
        self.written: set[int] = set()
        self.announced = 0
        self.pending: list[Future] = []
        self.frames: queue.Queue = queue.Queue()
        self.mp4_error: BaseException | None = None
        self.mp4 = threading.Thread(target=self._encode, args=(video_path,), daemon=True)
        self.mp4.start()

    def _stream(self):
        while (frame := self.frames.get()) is not self._END:
            if frame is self._ABORT:
                raise Cancelled("the job ended without its video")  # atomic_output leaves no file
            yield frame

    def _encode(self, path: Path) -> None:
        try:
            write_mp4(self._stream(), path)
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.mp4_error = e

    def put(self, index: int, frame) -> None:
        """Frames come in temporal order."""
        self.frames.put(frame)
        self.pending.append(self.pool.submit(self._write, index, frame))

    def _write(self, index: int, frame) -> None:
        Image.fromarray(frame).save(self.frame_path(index), compress_level=1)
        with self.lock:
            self.written.add(index)
            before = self.announced
            while self.announced in self.written:
                self.written.discard(self.announced)
                self.announced += 1
            if self.announced > before:
                self.on_written(self.announced)

    def finish(self) -> None:
        """Wait for every file; raise the first write error."""
        self.frames.put(self._END)
        for f in self.pending:
            f.result()
        self.mp4.join()
        if self.mp4_error is not None:
            raise self.mp4_error

    def abort(self) -> None:
        """The job ends without its video: frames not yet written are dropped, the partial mp4 is not kept."""
        self.frames.put(self._ABORT)
        for f in self.pending:
            f.cancel()
        wait([f for f in self.pending if not f.cancelled()])
        self.mp4.join()


def default_warm_rows(max_active: int, device) -> int:
    """Rows whose merged-step buckets a server captures before serving unless told: one guided call per active job
    on a GPU (CUDA graphs), none on the CPU (nothing to capture)."""
    return 2 * max_active if torch.device(device).type == "cuda" else 0


class Server:
    """The pipeline (its networks shared by the workers, steps merged), the job store, the queue and the workers."""

    def __init__(self, pipeline, data_dir: str | Path, max_queue: int = 16, max_active: int = 4,
                 start: bool = True, warm_rows: int = 0):
        """`max_active`: jobs that run at once (their steps batched together); `start`: run the workers (False:
        jobs are accepted and recorded, none runs; for tests); `warm_rows`: capture the merged denoising step's
        row buckets up to this many rows before serving (`SharedNetworks.warm`)."""
        if max_active < 1:
            raise UserError(f"max_active {max_active}: at least one job must be able to run; use 1 or more")
        self.data = Path(data_dir)
        self.data.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.data / "jobs.db")
        self.max_queue = max_queue
        self.queue: list[str] = self.store.unfinished()  # accepted before a restart: run again, in order
        self.cancelled: set[str] = set()
        self.live: dict[str, tuple[str, int]] = {}  # job -> (state, frames done), for the frame streams
        self.png_pool = ThreadPoolExecutor(PNG_WRITERS, thread_name_prefix="nuwaxl-png")
        # Finished levels are saved off the threads that drive the GPU, in the order they finished.
        self.level_pool = ThreadPoolExecutor(1, thread_name_prefix="nuwaxl-levels")
        self.wake = threading.Condition()
        self.stopping = False
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("nuwaxl_queue_depth", "jobs accepted and not yet running", registry=self.registry)
        self.jobs = Counter("nuwaxl_jobs", "jobs that ended, by state", ["state"], registry=self.registry)
        self.frames = Counter("nuwaxl_frames", "frames made", registry=self.registry)
        self.first_frame = Gauge("nuwaxl_time_to_first_frame_seconds",
                                 "the last job's time from start to its first frame", registry=self.registry)
        self.active = Gauge("nuwaxl_active_jobs", "jobs running now", registry=self.registry)
        self.step_rows = Histogram("nuwaxl_step_rows", "rows (calls, x2 with guidance) per merged denoising step",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.step_jobs = Histogram("nuwaxl_step_jobs", "jobs per merged denoising step", buckets=(1, 2, 4, 8, 16),
                                   registry=self.registry)
        step_buckets = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
        self.step_period = Histogram("nuwaxl_step_period_seconds", "time from one merged denoising step's start to "
                                     "the next one's", buckets=step_buckets, registry=self.registry)
        self.step_gpu = Histogram("nuwaxl_step_gpu_seconds", "GPU time of a merged denoising step",
                                  buckets=step_buckets, registry=self.registry)
        self.queue_depth.set(len(self.queue))
        self.pipeline = type(pipeline)(SharedNetworks(pipeline.nets, on_merged=self._merged))
        if warm_rows:
            self.pipeline.nets.warm(warm_rows)
        self.workers = [threading.Thread(target=self._work, name=f"nuwaxl-worker-{i}", daemon=True)
                        for i in range(max_active)]
        if start:
            for w in self.workers:
                w.start()

    def _merged(self, call: MergedCall) -> None:
        self.step_rows.observe(call.rows)
        self.step_jobs.observe(call.jobs)
        if call.since_last_s is not None:
            self.step_period.observe(call.since_last_s)
        if call.previous_gpu_s is not None:
            self.step_gpu.observe(call.previous_gpu_s)

    def submit(self, request: VideoRequest) -> str:
        with self.wake:
            if len(self.queue) >= self.max_queue:
                raise HTTPException(429, f"the queue is full ({self.max_queue} jobs); try again later",
                                    headers={"Retry-After": str(RETRY_AFTER_S)})
            try:  # the pipeline's checks, before the job is accepted: the CLI's messages
                self.pipeline.prepare(request.prompts, request.num_frames, **request.pipeline_kwargs())
            except UserError as e:
                raise HTTPException(422, str(e)) from None
            job_id = uuid.uuid4().hex
            self.store.add(job_id, request)
            self.queue.append(job_id)
            self.queue_depth.set(len(self.queue))
            self.wake.notify()
        return job_id

    def cancel(self, job_id: str) -> dict:
        job = self.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        with self.wake:
            if job_id in self.queue:
                self.queue.remove(job_id)
                self.queue_depth.set(len(self.queue))
                self._record(job_id, state="cancelled", finished=time.time())
                self.jobs.labels("cancelled").inc()
            elif job["state"] in UNFINISHED:  # running, or taken by the worker a moment ago
                self.cancelled.add(job_id)  # the run stops after its current denoising step
        return self.store.get(job_id)

    def stop(self, wait_s: float = 5.0) -> None:
        """Stop taking jobs; wait up to `wait_s` for the running ones. A job still running stays `running` in the
        database and runs again when the server restarts."""
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        deadline = time.monotonic() + wait_s
        for w in self.workers:
            if w.is_alive():
                w.join(timeout=max(0.0, deadline - time.monotonic()))
        if not any(w.is_alive() for w in self.workers):  # else a worker still writes to it; the process exit
            self.store.db.close()  # closes it

    def _record(self, job_id: str, **fields) -> None:
        """A job's progress: into the database, and into memory for the frame streams."""
        self.store.update(job_id, **fields)
        state, done = self.live.get(job_id, ("queued", 0))
        self.live[job_id] = (fields.get("state", state), fields.get("frames_done", done))

    def progress(self, job_id: str) -> tuple[str, int] | None:
        """(state, frames done) of a job, from memory when this server ran it, else from the database."""
        if job_id in self.live:
            return self.live[job_id]
        job = self.store.get(job_id)
        return None if job is None else (job["state"], job["frames_done"])

    def frame_path(self, job_id: str, index: int) -> Path:
        return self.data / job_id / f"{index:06d}.png"

    def video_path(self, job_id: str) -> Path:
        return self.data / f"{job_id}.mp4"

    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.queue and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    return
                job_id = self.queue.pop(0)
                self.queue_depth.set(len(self.queue))
            self.active.inc()
            try:
                self._run(job_id)
            finally:
                self.active.dec()

    def level_path(self, job_id: str, level: int) -> Path:
        return self.data / job_id / f"level{level}.safetensors"

    def _save_level(self, job_id: str, level: int, frames: dict) -> None:
        """A finished level's frames, then its count in the database (a resumed run starts after it)."""
        with atomic_output(self.level_path(job_id, level)) as tmp:
            save_file({str(p): t.detach().cpu().contiguous() for p, t in frames.items()}, str(tmp))
        self._record(job_id, levels_done=level)

    def _finished_levels(self, job_id: str, levels: int) -> dict:
        """Frames of the job's levels 1..`levels`, as `_save_level` kept them."""
        frames = {}
        for level in range(1, levels + 1):
            frames.update({int(p): t for p, t in load_file(str(self.level_path(job_id, level))).items()})
        return frames

    def _run(self, job_id: str) -> None:
        job = self.store.get(job_id)
        request = VideoRequest.model_validate_json(job["request"])
        started = time.time()
        self._record(job_id, state="running", started=started, frames_done=0, first_frame_s=None, error=None)
        (self.data / job_id).mkdir(exist_ok=True)
        saved = {"at": 0.0}

        def written(count: int) -> None:  # PNG threads, in order: `count` frames are on disk
            fields = {"frames_done": count}
            if count == 1:
                fields["first_frame_s"] = time.time() - started
                self.first_frame.set(fields["first_frame_s"])
            if count == 1 or time.monotonic() - saved["at"] >= PROGRESS_DB_S:
                saved["at"] = time.monotonic()
                self._record(job_id, **fields)
            else:
                self.live[job_id] = (self.live.get(job_id, ("running", 0))[0], count)

        output = FrameOutput(self.png_pool, lambda i: self.frame_path(job_id, i), self.video_path(job_id), written)
        level_saves: list[Future] = []
        try:
            finished = self._finished_levels(job_id, job["levels_done"])
            count = 0
            for index, frame in self.pipeline.iter_frames(
                    request.prompts, request.num_frames, progress=False, cancel=lambda: job_id in self.cancelled,
                    finished=finished, on_level=lambda lv, fr: level_saves.append(
                        self.level_pool.submit(self._save_level, job_id, lv, fr)),
                    **request.pipeline_kwargs()):
                output.put(index, frame)
                self.frames.inc()
                count += 1
            for save in level_saves:
                save.result()
            output.finish()
            self._record(job_id, state="done", finished=time.time(), frames_done=count)
            for saved_level in (self.data / job_id).glob("level*.safetensors"):  # no longer needed
                saved_level.unlink()
            self.jobs.labels("done").inc()
        except Cancelled:  # after the denoising step in which DELETE came
            wait(level_saves)
            output.abort()
            self.cancelled.discard(job_id)
            self._record(job_id, state="cancelled", finished=time.time(), frames_done=output.announced)
            self.jobs.labels("cancelled").inc()
        except Exception as e:  # this job fails alone, with its reason; the server goes on
            wait(level_saves)
            output.abort()
            self._record(job_id, state="failed", finished=time.time(), frames_done=output.announced,
                         error=f"{type(e).__name__}: {e}")
            self.jobs.labels("failed").inc()


def public(job: dict, progress: tuple[str, int] | None = None) -> dict:
    """A job as the API shows it; `progress`: (state, frames done) from memory (the database lags by up to
    `PROGRESS_DB_S`)."""
    request = json.loads(job["request"])
    state, frames_done = progress or (job["state"], job["frames_done"])
    return {"id": job["id"], "state": state, "num_frames": request["num_frames"],
            "frames_done": frames_done, "levels_done": job["levels_done"], "error": job["error"],
            "timings": {"created": job["created"], "started": job["started"], "finished": job["finished"],
                        "first_frame_s": job["first_frame_s"]}}


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="trt-nuwaxl", summary="NUWA-XL long-video generation")

    @app.post("/v1/videos", status_code=202)
    def submit(request: VideoRequest) -> dict:
        return {"id": server.submit(request)}

    @app.get("/v1/videos/{job_id}.mp4")
    def video(job_id: str):
        job = server.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if job["state"] != "done":
            raise HTTPException(409, f"job {job_id} is {job['state']}; the mp4 exists once it is done")
        return FileResponse(server.video_path(job_id), media_type="video/mp4", filename=f"{job_id}.mp4")

    @app.get("/v1/videos/{job_id}")
    def status(job_id: str) -> dict:
        job = server.store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return public(job, server.progress(job_id))

    @app.get("/v1/videos/{job_id}/frames/{index}.png")
    def frame(job_id: str, index: int):
        progress = server.progress(job_id)
        if progress is None:
            raise HTTPException(404, f"no job {job_id}")
        if not 0 <= index < progress[1]:
            raise HTTPException(404, f"frame {index} of job {job_id} is not final yet ({progress[1]} are)")
        return FileResponse(server.frame_path(job_id, index), media_type="image/png")

    @app.delete("/v1/videos/{job_id}")
    def cancel(job_id: str) -> dict:
        return public(server.cancel(job_id))

    @app.get("/v1/videos/{job_id}/events")
    async def events(job_id: str) -> StreamingResponse:
        if server.progress(job_id) is None:
            raise HTTPException(404, f"no job {job_id}")

        async def stream():
            sent = 0
            while True:
                state, done = server.progress(job_id)
                for index in range(sent, done):
                    frame = {"index": index, "url": f"/v1/videos/{job_id}/frames/{index}.png"}
                    yield f"event: frame\ndata: {json.dumps(frame)}\n\n"
                sent = done
                if state not in UNFINISHED:
                    job = server.store.get(job_id)
                    end = {"state": state, "error": job["error"],
                           "video": f"/v1/videos/{job_id}.mp4" if state == "done" else None}
                    yield f"event: end\ndata: {json.dumps(end)}\n\n"
                    return
                await asyncio.sleep(EVENTS_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (resources.files("nuwaxl") / "assets" / "index.html").read_text()

    @app.get("/healthz")
    def healthz() -> dict:
        alive = sum(w.is_alive() for w in server.workers)
        return {"ok": alive == len(server.workers), "workers": alive, "queue": len(server.queue)}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(UserError)
    def user_error(_, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    return app
