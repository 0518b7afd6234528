"""CPU smoke run of the speed harness on the tiny preset: every recorded field is present and sane.
(Speed itself is measured on the GPU machine and recorded in benchmarks/results, never asserted here.)"""

import json
from pathlib import Path

import pytest

from benchmarks.report_speed import main as report_main
from benchmarks.speed import SETS, flops_per_item, run_scenario
from nuwaxl.runtime.pipeline import Pipeline


def test_cpu_smoke_scenarios_record_everything(tmp_path, monkeypatch):
    pipe = Pipeline.from_preset("tiny", device="cpu")
    per_item = flops_per_item(pipe.config, 16)
    assert set(per_item) == {"text_encoder", "unet_prepare", "unet_step", "vae_encoder", "vae_decoder"}
    assert per_item["unet_step"] > per_item["unet_prepare"] > 0
    rows = [run_scenario(pipe, s, per_item, peak_tflops=None) for s in SETS["cpu-smoke"]]
    for row in rows:
        assert row["wall_s_min"] <= row["wall_s_median"] <= row["wall_s_max"]
        assert 0 < row["first_frame_s_median"] <= row["first_segment_s_median"] <= row["wall_s_max"]
        assert row["frames_per_s"] > 0 and row["flops_counted"] > 0 and row["calls"] >= 1
    dod40 = next(r for r in rows if r["num_frames"] == 40 and r["mode"] == "dod")
    assert dod40["calls_per_level"] == [1, 3]
    assert {"level1_sample_s", "level2_encode_conditions_s", "level2_decode_s"} <= set(dod40["stage_profile_s"])
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"set": "cpu-smoke", "backend": "torch-eager", "env": {"torch": "x", "cpu": "y",
                                                                                          "git_sha": "z"},
                                   "scenarios": rows}))
    monkeypatch.setattr("sys.argv", ["report", str(tmp_path / "table"), str(results)])
    report_main()
    table = (tmp_path / "table.md").read_text()
    row40 = next(line for line in table.splitlines()
                 if line.startswith("| tiny random, 2 ddim | 32 | 40 | eager | 1 |"))
    assert "AR over Diffusion" in table and row40.count(" s (") == 2  # AR and DoD times, with the reduction


def test_report_compares_each_run_with_its_own_autoregressive_row(tmp_path, monkeypatch):
    """Two recorded runs of the same backend (say, engines built at two commits): each DoD row's reduction is
    against the AR row measured in the same run, not the other run's."""
    def scenario(mode, wall):
        return {"mode": mode, "gpus": 1, "preset": "paper", "steps": 50, "sampler": "ddim", "resolution": 128,
                "num_frames": 1024, "wall_s_median": wall, "wall_s_min": wall, "wall_s_max": wall, "repeats": 1,
                "frames_per_s": 1024 / wall, "first_frame_s_median": 0.3}

    files = []
    for sha, ar in (("aaa", 20.0), ("bbb", 10.0)):
        f = tmp_path / f"{sha}.json"
        f.write_text(json.dumps({"backend": {"backend": "torch"}, "env": {"torch": "x", "gpu": "y", "git_sha": sha},
                                 "scenarios": [scenario("ar", ar), scenario("dod", 5.0)]}))
        files.append(str(f))
    monkeypatch.setattr("sys.argv", ["report", str(tmp_path / "table"), *files])
    report_main()
    rows = {line.split(" | ")[-2]: line for line in (tmp_path / "table.md").read_text().splitlines()
            if line.startswith("| paper random")}
    assert "| 20.00 s (n=1) | 5.00 s (n=1) | 75.0% |" in rows["aaa"]
    assert "| 10.00 s (n=1) | 5.00 s (n=1) | 50.0% |" in rows["bbb"]


def test_serve_load_test_smoke(tmp_path):
    """The serving load test on the tiny preset over real HTTP (uvicorn, httpx): every job done, rows recorded."""
    import subprocess
    import sys

    out = tmp_path / "load.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    done = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--device", "cpu",
                           "--clients", "1,2", "--frames", "8", "--steps", "2", "--compare-sequential", "--out",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["clients"]) for r in rows] == [("batched", 1), ("batched", 2), ("one at a time", 2)]
    for r in rows:
        assert r["states"] == ["done"] and not r["errors"] and r["frames_per_s"] > 0
        assert 0 < r["ttff_p50_s"] <= r["ttff_p95_s"] <= r["wall_s"]


def test_trained_scenarios_run_the_bundled_weights_as_recommended(tmp_path, monkeypatch):
    """The "trained" set times what a user of the bundled weights runs: their recommended sampler, steps and
    guidance (the UNet's work counted twice), on the bundled story's words."""
    from dataclasses import replace

    from benchmarks.speed import engines_key, pipeline_for, pipeline_key, request_for, story_for

    s = replace(next(s for s in SETS["trained"] if s.num_frames == 16 and s.mode == "dod"), repeats=1)
    assert s.name == "bundled-small-64px-16f-dod-defaults"
    pipe = pipeline_for(s, "cpu", "eager")
    recommended = pipe.nets.spec.sampling
    assert pipe.nets.spec.trained_on.trained and recommended.guidance_scale > 1
    # engines built from these weights run the trained scenarios, engines of random weights the others
    assert engines_key(pipe) == pipeline_key(s) != pipeline_key(replace(s, weights="random"))
    request = request_for(pipe, s)
    assert (request.options.num_inference_steps, request.options.sampler, request.options.guidance_scale) == \
        (recommended.num_inference_steps, recommended.sampler, recommended.guidance_scale)
    assert request.call_steps == 2 * recommended.num_inference_steps  # one call, guided
    assert story_for(s) != story_for(replace(s, weights="random"))
    per_item = flops_per_item(pipe.config, 16)
    row = run_scenario(pipe, s, per_item, peak_tflops=None)
    assert row["sampling"]["guidance_scale"] == recommended.guidance_scale and row["weights"] == "bundled"
    unet = per_item["unet_step"] * 2 * recommended.num_inference_steps + per_item["unet_prepare"] * 2
    assert row["flops_counted"] == unet + per_item["vae_encoder"] + per_item["vae_decoder"] + \
        per_item["text_encoder"] * (len(set(story_for(s))) + 1)
    # the report names the model and sampling of each row, and built engines' backend
    rows = [row, {**row, "mode": "ar", "wall_s_median": 2 * row["wall_s_median"]}]
    results = tmp_path / "t.json"
    engines = {"engines": "e", "backend": "torch", "cuda_graphs": "on"}  # what speed.py records for --engines
    env = {"torch": "x", "cpu": "y", "git_sha": "z"}
    results.write_text(json.dumps({"set": "trained", "backend": engines, "env": env, "scenarios": rows}))
    monkeypatch.setattr("sys.argv", ["report", str(tmp_path / "table"), str(results)])
    report_main()
    table = (tmp_path / "table.md").read_text()
    model = (f"small trained, {recommended.num_inference_steps} {recommended.sampler}, "
             f"guidance {recommended.guidance_scale:g}")
    assert f"| {model} | 64 | 16 | engines (torch) | 1 |" in table and "| 50.0% |" in table
    assert "except rows marked trained" in table
    with pytest.raises(ValueError, match="bundled weights are small at 64 px"):
        pipeline_for(replace(s, preset="paper", resolution=128), "cpu", "eager")
