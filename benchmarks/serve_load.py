"""A bounded localhost load test of `trt-nuwaxl serve`: the real HTTP stack (uvicorn in this process, clients over
TCP), a fixed number of requests per row.

For each concurrency C in --clients: C clients each POST one request at the same moment and read its frame stream
(`/v1/videos/ID/events`, no polling) until it ends. Measured per row: time to first frame per request as a client
sees it (POST -> its first `frame` event), its p50 / p95, and aggregate frames/s (all frames / wall time from the
first POST to the last job done). `--compare-sequential` runs the same C requests with one job at a time
(`max_active=1`) too: the throughput that cross-request batching adds.

    python benchmarks/serve_load.py --preset tiny --device cpu --clients 1,4 --frames 16 --steps 4 --out r.json
    python benchmarks/serve_load.py --preset paper --device cuda --torch-mode cudagraph --clients 1,4,16 \\
        --frames 16 --steps 50 --compare-sequential --out r.json        # random weights: speed only

Random weights unless --checkpoint/--engines say otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(pipe, data: Path, max_active: int, max_queue: int):
    """The server on a free localhost port, in a thread; returns (server, base url, stop)."""
    import uvicorn

    from nuwaxl.serve import Server, create_app, default_warm_rows

    server = Server(pipe, data, max_queue=max_queue, max_active=max_active,
                    warm_rows=default_warm_rows(max_active, pipe.nets.spec.device))  # as `trt-nuwaxl serve` does
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while not web.started:
        time.sleep(0.01)

    def stop():
        web.should_exit = True
        thread.join(timeout=10)
        server.stop()

    return server, url, stop


def sse_events(lines):
    """Server-Sent Events from the lines of a stream: (event, data) pairs, as they arrive."""
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))


def client(url: str, request: dict, out: list, start: threading.Barrier) -> None:
    """POST one request, then read its frame stream (`/v1/videos/ID/events`): no polling."""
    with httpx.Client(base_url=url, timeout=None) as http:
        start.wait()
        t0 = time.perf_counter()
        answer = http.post("/v1/videos", json=request)
        answer.raise_for_status()
        job_id, first, frames, end = answer.json()["id"], None, 0, {"state": "lost", "error": "stream ended"}
        with http.stream("GET", f"/v1/videos/{job_id}/events") as events:
            for name, data in sse_events(events.iter_lines()):
                if name == "frame":
                    last = time.perf_counter()
                    first = first if first is not None else last - t0
                    frames += 1
                elif name == "end":
                    end = data
                    break
        out.append({"state": end["state"], "ttff_s": first, "done_s": time.perf_counter() - t0,
                    "last_frame_s": last - t0 if frames else None, "frames": frames, "error": end["error"]})


def direct_row(pipe, clients: int, request: dict, max_active: int) -> dict:
    """The same requests without HTTP or the job store: threads on one SharedNetworks pipeline (max_active > 1)
    or one after another, to tell the batching's own cost from the server's."""
    from nuwaxl.runtime.batching import SharedNetworks

    shared = type(pipe)(SharedNetworks(pipe.nets)) if max_active > 1 else pipe
    results: list[dict] = []
    kw = {k: v for k, v in request.items() if k != "prompts"}

    def one(i):
        t0, first, n = time.perf_counter(), None, 0
        for _ in shared.iter_frames(request["prompts"], progress=False, **dict(kw, seed=i)):
            first = first or time.perf_counter() - t0
            n += 1
        results.append({"ttff_s": first, "frames": n})

    t0 = time.perf_counter()
    if max_active > 1:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(clients):
            one(i)
    wall = time.perf_counter() - t0
    ttff = sorted(r["ttff_s"] for r in results)
    return {"clients": clients, "max_active": max_active, "wall_s": round(wall, 3),
            "frames_per_s": round(sum(r["frames"] for r in results) / wall, 2),
            "ttff_p50_s": round(statistics.median(ttff), 3), "ttff_max_s": round(ttff[-1], 3)}


def row(pipe, clients: int, request: dict, max_active: int, trace: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as data:
        server, url, stop = serve(pipe, Path(data), max_active=max_active, max_queue=max(16, clients))
        tracer = None
        if trace:
            from serve_trace import Trace

            tracer = Trace().attach(server.pipeline.nets)
        try:
            results: list[dict] = []
            start = threading.Barrier(clients)
            threads = [threading.Thread(target=client, args=(url, dict(request, seed=i), results, start))
                       for i in range(clients)]
            t0 = time.perf_counter()
            if tracer is not None:
                tracer.t0 = t0
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            metrics = httpx.get(f"{url}/metrics").text
            traced = tracer.summary(wall) if tracer is not None else None
        finally:
            stop()
    ttff = sorted(r["ttff_s"] for r in results if r["ttff_s"] is not None)
    step_metrics = ("nuwaxl_step_jobs_", "nuwaxl_step_period_seconds_", "nuwaxl_step_gpu_seconds_")
    jobs_per_step = [line for line in metrics.splitlines() if line.startswith(step_metrics) and "_created" not in line]
    return {"clients": clients, "max_active": max_active, "wall_s": round(wall, 3),
            "frames_per_s": round(sum(r["frames"] for r in results) / wall, 2),
            "ttff_p50_s": round(statistics.median(ttff), 3) if ttff else None,
            "ttff_p95_s": round(ttff[min(len(ttff) - 1, round(0.95 * (len(ttff) - 1)))], 3) if ttff else None,
            "states": sorted({r["state"] for r in results}), "errors": [r["error"] for r in results if r["error"]],
            "merged_step_metrics": jobs_per_step,
            "jobs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in results],
            **({"trace": traced} if traced is not None else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None)
    src.add_argument("--engines", default=None)
    src.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--torch-mode", default=None)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--max-active", type=int, default=None, help="default: the row's number of clients")
    ap.add_argument("--compare-sequential", action="store_true")
    ap.add_argument("--direct", action="store_true", help="no HTTP: threads call the pipeline (see direct_row)")
    ap.add_argument("--warm-rows", action="store_true", help="run each batched row once before measuring it")
    ap.add_argument("--trace", action="store_true", help="record a timeline of the network calls (serve_trace.py)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from nuwaxl.runtime.pipeline import Pipeline

    if args.engines:
        pipe = Pipeline.from_engines(args.engines, device=args.device, torch_mode=args.torch_mode or "aoti")
    elif args.preset:
        pipe = Pipeline.from_preset(args.preset, device=args.device, torch_mode=args.torch_mode or "eager")
    else:
        pipe = Pipeline.from_pretrained(args.checkpoint, device=args.device, torch_mode=args.torch_mode or "eager")
    request = {"prompts": ["Fred stands in the stone house"], "num_frames": args.frames,
               "num_inference_steps": args.steps}
    row(pipe, 1, request, 1)  # warm-up: CUDA graphs, compilation, allocator
    rows = []
    for c in [int(x) for x in args.clients.split(",")]:
        measure = direct_row if args.direct else row
        if args.warm_rows:  # the same row once before, unrecorded: CUDA graphs for every merged row count exist
            measure(pipe, c, request, args.max_active or c)
        traced = {"trace": True} if args.trace and not args.direct else {}
        rows.append({"mode": "batched", "http": not args.direct,
                     **measure(pipe, c, request, args.max_active or c, **traced)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "trace"}), flush=True)
        if args.compare_sequential and c > 1:
            rows.append({"mode": "one at a time", "http": not args.direct, **measure(pipe, c, request, 1, **traced)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "trace"}), flush=True)
    env = {"device": str(pipe.nets.spec.device), "backend": pipe.nets.spec.backend, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "git_sha": os.environ.get("NUWAXL_GIT_SHA"), "driver": os.environ.get("NUWAXL_DRIVER")}
    record = {"weights": "random" if args.preset else (args.engines or args.checkpoint or "bundled"),
              "preset": args.preset, "request": request, "env": env, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
