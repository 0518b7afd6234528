"""pytest-benchmark form of the speed scenarios (benchmarks/speed.py).

    NUWAXL_BENCH_SET=table1-128 NUWAXL_BENCH_BACKEND=cudagraph pytest benchmarks/test_speed.py --benchmark-enable \
        --benchmark-json=r.json
    NUWAXL_BENCH_SET=table1-128 NUWAXL_BENCH_ENGINES=DIR pytest benchmarks/test_speed.py --benchmark-enable  # engines
Defaults to the CPU smoke set. Timing is recorded, never asserted.
"""

import os
from dataclasses import replace

import pytest
import torch

from benchmarks.speed import SETS, engines_key, pipeline_for, pipeline_key, run_once
from nuwaxl.runtime.pipeline import Pipeline

SET = os.environ.get("NUWAXL_BENCH_SET", "cpu-smoke")
BACKEND = os.environ.get("NUWAXL_BENCH_BACKEND", "eager")
ENGINES = os.environ.get("NUWAXL_BENCH_ENGINES")  # an engine directory: the scenarios of its weights and shapes
PIPES: dict = {}


@pytest.mark.parametrize("scenario", SETS[SET], ids=lambda s: s.name)
def test_generation_speed(benchmark, scenario):
    key = pipeline_key(scenario)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if ENGINES and not PIPES:
        pipe = Pipeline.from_engines(ENGINES, device=device)
        PIPES[engines_key(pipe)] = pipe
    if key not in PIPES:
        if ENGINES:
            pytest.skip(f"{ENGINES} holds {list(PIPES)} engines, not {key}")
        PIPES[key] = pipeline_for(scenario, device, BACKEND)
    pipe = PIPES[key]
    if pipe.nets.spec.frames_per_call:
        scenario = replace(scenario, frames_per_call=pipe.nets.spec.frames_per_call)
    run_once(pipe, replace(scenario, repeats=1))  # warm-up outside the timed rounds
    result = benchmark.pedantic(run_once, args=(pipe, scenario), rounds=scenario.repeats, iterations=1)
    benchmark.extra_info.update(result)
