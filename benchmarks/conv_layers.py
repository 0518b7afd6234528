"""Which convolutions of a network pick which cuDNN kernels: every Conv2d of the live module (fp16, channels-last
weights, temporal convolutions as (k, 1) Conv2d over frames-as-height, as in the engines' packages) is run alone on
the input it gets inside one call of `--rows` rows, and profiled (`kernel_profile.py`). Rows are grouped by layer
shape; the JSON keeps each group's kernels and milliseconds per call.

    python benchmarks/conv_layers.py --network vae_encoder --rows 69 --out conv-layers.json    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from aoti_step_variants import DEVICE, feeds, models_and_spec  # noqa: E402
from kernel_profile import kernel_profile  # noqa: E402


def conv_inputs(module: nn.Module, args) -> list[tuple[str, nn.Conv2d, tuple, tuple]]:
    """(name, conv, input shape, input strides) of every Conv2d call in one forward of `module(*args)` (shapes only:
    keeping every input of a large call would not fit in memory)."""
    seen, hooks = [], []
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, inp, name=name: seen.append((name, mod, tuple(inp[0].shape), inp[0].stride()))))
    try:
        with torch.inference_mode():
            module(*args)
    finally:
        for h in hooks:
            h.remove()
    return seen


def main() -> None:
    from nuwaxl.engine.torch_backend import channels_last_convs
    from nuwaxl.models.layers import temporal_conv_layout

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--network", default="vae_encoder")
    ap.add_argument("--rows", type=int, default=69)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    module, spec, config = models_and_spec(args.preset, args.rows, "nhwc", args.network)
    x = feeds(spec, args.rows, config)
    groups: dict[str, dict] = defaultdict(lambda: {"layers": [], "ms_per_call": 0.0, "kernels": defaultdict(float)})
    with torch.no_grad(), temporal_conv_layout(module, "frames-as-height"):
        channels_last_convs(module)  # the (k, 1) convolutions made for frames-as-height too, as in the packages
        calls = conv_inputs(module, [x[t.name] for t in spec.inputs])
        for name, conv, shape, stride in calls:
            inp = torch.empty_strided(shape, stride, device=DEVICE, dtype=conv.weight.dtype).normal_()
            layout = "nhwc" if inp.is_contiguous(memory_format=torch.channels_last) else "nchw"
            key = (f"{conv.in_channels}->{conv.out_channels} k{tuple(conv.kernel_size)} s{tuple(conv.stride)} "
                   f"in {tuple(inp.shape)} {layout}")
            with torch.inference_mode():
                prof = kernel_profile(conv, inp, calls=3, top=4)
            del inp
            g = groups[key]
            g["layers"].append(name)
            g["ms_per_call"] += prof["gpu_ms_per_call"]
            for kernel, ms in prof["top_kernels_ms"]:
                g["kernels"][kernel] += ms
    rows = sorted(({"shape": k, "count": len(g["layers"]), "ms_per_call": round(g["ms_per_call"], 3),
                    "kernels_ms": {n: round(v, 3) for n, v in sorted(g["kernels"].items(), key=lambda kv: -kv[1])},
                    "layers": g["layers"]} for k, g in groups.items()), key=lambda r: -r["ms_per_call"])
    out = {"preset": args.preset, "network": args.network, "rows": args.rows, "device": str(DEVICE),
           "gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else None, "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version() if DEVICE.type == "cuda" else None,
           "git": os.environ.get("NUWAXL_GIT_SHA", "unknown"), "weights": "random (speed does not depend on them)",
           "total_conv_ms": round(sum(r["ms_per_call"] for r in rows), 2), "groups": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    for r in rows[:12]:
        top = next(iter(r["kernels_ms"]), "")
        print(f"{r['ms_per_call']:8.2f} ms  x{r['count']:<3d} {r['shape']}  {top[:70]}")


if __name__ == "__main__":
    main()
