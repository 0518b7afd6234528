"""Where opening an engine directory's AOTInductor packages spends its time, in a new process: importing torch,
CUDA start, each network's weights to the GPU, each package (through the runtime's `load_package`, or with
`--loader torch` through torch's `aoti_load_package`), and handing the weights over as user-managed constants.
Prints one JSON line per network, then the whole record.

    python benchmarks/aoti_load_profile.py ENGINE_DIR --loader torch > load.txt

Recorded: benchmarks/results/aoti-load-profile-h200-d51069d.txt, with `--loader torch` (the first package took
50 s: torch's Python loader compiles CPU ISA probes; hence the runtime's own `load_package`).
"""

import argparse
import json
import time

T0 = time.perf_counter()
import torch  # noqa: E402  (timed)

NETWORKS = ["text_encoder", "unet_prepare", "unet_step", "vae_encoder", "vae_decoder"]


def main(directory: str, loader: str) -> None:
    from pathlib import Path

    from safetensors.torch import load_file

    from nuwaxl.engine.torch_backend import load_package

    record = {"import_torch_s": time.perf_counter() - T0, "loader": loader}
    t = time.perf_counter()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    record["cuda_init_s"] = time.perf_counter() - t
    folder = Path(directory) / "torch"
    record["networks"] = {}
    for name in NETWORKS:
        row = {}
        t = time.perf_counter()
        weights = load_file(str(folder / f"{name}.safetensors"), device="cuda:0")
        torch.cuda.synchronize()
        row["weights_s"] = time.perf_counter() - t
        row["weights_bytes"] = sum(w.numel() * w.element_size() for w in weights.values())
        for package in sorted(folder.glob(f"{name}*.pt2")):
            t = time.perf_counter()
            fn = (torch._inductor.aoti_load_package(str(package), run_single_threaded=True) if loader == "torch"
                  else load_package(package, torch.device("cuda", 0)))
            loaded = time.perf_counter()
            fn.load_constants({k: weights[k] for k in fn.get_constant_fqns()}, check_full_update=True,
                              user_managed=True)
            torch.cuda.synchronize()
            row[package.name] = {"bytes": package.stat().st_size, "load_package_s": loaded - t,
                                 "load_constants_s": time.perf_counter() - loaded}
        record["networks"][name] = row
        print(name, json.dumps(row), flush=True)
    record["total_s"] = time.perf_counter() - T0
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", help="an engine directory built with --backend torch on this GPU")
    ap.add_argument("--loader", choices=("project", "torch"), default="project")
    args = ap.parse_args()
    main(args.directory, args.loader)
