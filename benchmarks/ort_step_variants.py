"""Experiment: where ONNX Runtime's `unet_step` loses to AOTInductor, and which export / provider options close it.

Graphs: "decomposed" (attention as MatMul / Softmax), "mha" (attention as ONNX Runtime's fused
`com.microsoft.MultiHeadAttention`, `export.onnx_export.ort_attention`), "fused" (what a CUDA build of the ONNX
Runtime backend makes: the fp32 export rewritten by ONNX Runtime's transformer optimizer, then converted to fp16,
`engine.onnxruntime_backend.fuse_graph`); each with the CUDA provider's defaults or with `prefer_nhwc` (NHWC
convolutions). Each is timed alone as a CUDA-graph replay (ONNX Runtime's own capture, as the runtime runs it), its
output compared with the live module's, and profiled per kernel (plain runs under torch.profiler, which sees every
CUDA kernel of the process, ONNX Runtime's included).

    python benchmarks/ort_step_variants.py --out ort-step-variants.json [--preset paper] [--rows 1,69]
        [--network unet_step] [--graphs decomposed,mha,fused] [--options default,prefer_nhwc] [--built DIR]

Random weights (seed 0): speed does not depend on weight values.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
from aoti_step_variants import DEVICE, DTYPE, feeds, models_and_spec, time_graph
from kernel_profile import kernel_profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--rows", default="1,69", help="batch sizes to time; the largest is the export's max")
    ap.add_argument("--network", default="unet_step")
    ap.add_argument("--graphs", default="decomposed,mha")
    ap.add_argument("--options", default="default,prefer_nhwc")
    ap.add_argument("--folder", default="/tmp/ort-step-variants")
    ap.add_argument("--built", default=None, help="also time an engine directory's graph of this network, as built "
                    "(graph 'built'; the directory must come from the same preset's random weights)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from nuwaxl.engine.onnxruntime_backend import FUSED_ATTENTION, GRAPH_FUSIONS, OrtEngine, export_fused, status
    from nuwaxl.export.onnx_export import export_onnx, ort_attention

    rows = [int(r) for r in args.rows.split(",")]
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    net = args.network
    module, spec, config = models_and_spec(args.preset, max(rows), "nchw", net)
    names = [t.name for t in spec.inputs]
    exports, paths = {}, {}
    for graph in [g for g in args.graphs.split(",") if g]:
        path = paths[graph] = folder / f"{net}.{graph}.onnx"
        translations = ort_attention() if graph != "decomposed" and net in FUSED_ATTENTION else None
        if graph == "fused":  # as a CUDA build: fp32 export, ONNX Runtime's optimizer, fp16
            fp32_feeds = {k: v.float() if v.is_floating_point() else v
                          for k, v in feeds(spec, min(2, max(rows)), config).items()}
            exports[graph] = export_fused(copy.deepcopy(module).float(), spec, path, fp32_feeds, translations,
                                          GRAPH_FUSIONS[net], fp16=DTYPE == torch.float16)
        else:
            exports[graph] = export_onnx(module, spec, path, feeds(spec, min(2, max(rows)), config), translations)
        print(json.dumps({"exported": graph, **exports[graph]}), flush=True)
    if args.built:
        paths["built"] = Path(args.built) / "onnx" / f"{net}.onnx"
        exports["built"] = json.loads(paths["built"].with_suffix(".json").read_text())
        exports["built"].pop("io_spec", None)
    options = {"default": {}, "prefer_nhwc": {"prefer_nhwc": "1"}} if DEVICE.type == "cuda" else {"default": {}}
    options = {k: v for k, v in options.items() if k in args.options.split(",")}

    results, profiles = [], {}
    refs = {}
    for batch in rows:
        x = feeds(spec, batch, config)
        with torch.inference_mode():
            refs[batch] = module(*(x[n] for n in names)).float()  # one output per network
    for graph in exports:
        for opt, cuda_options in options.items():
            variant = f"{graph}+{opt}"
            t0 = time.perf_counter()
            engine = OrtEngine(paths[graph], spec, DEVICE, cuda_options=cuda_options)
            session_s = round(time.perf_counter() - t0, 1)
            for batch in rows:
                x = feeds(spec, batch, config)
                out = next(iter(engine.run(x).values())).float()
                ref = refs[batch]
                err = ((out - ref).norm() / ref.norm()).item()
                # a session ONNX Runtime cannot capture (engine.cuda_graphs says why) is timed as plain runs
                capture = getattr(engine, "capture", None) or (lambda f, engine=engine: (lambda: engine.run(f), None))
                ms = time_graph(engine.run, x, capture=capture)
                results.append({"variant": variant, "batch": batch, "median_ms": round(ms, 2),
                                "rel_err_vs_live": err, "session_s": session_s, "cuda_graphs": engine.cuda_graphs})
                print(json.dumps(results[-1]), flush=True)
                if DEVICE.type == "cuda" and batch == max(rows):
                    profiles[variant] = kernel_profile(engine.run, x)
                    print(json.dumps({variant: profiles[variant]["by_category_ms"]}), flush=True)
            del engine
            torch.cuda.empty_cache()
    env = {"gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "onnxruntime": status().get("version"),
           "git_sha": os.environ.get("NUWAXL_GIT_SHA"), "driver": os.environ.get("NUWAXL_DRIVER")}
    record = {"experiment": f"ONNX Runtime {net} variants", "network": net, "preset": args.preset,
              "weights": "random (seed 0)",
              "dtype": str(DTYPE), "env": env, "exports": exports, "results": results, "profiles": profiles}
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
