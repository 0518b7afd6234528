"""PyTorch engines: eager (the reference), torch.compile, CUDA graphs per batch size, and AOTInductor packages.

Eager, compile and CUDA-graph engines wrap live modules built from a checkpoint; an AOTInductor package (.pt2)
is a compiled engine file that runs without the model code.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from nuwaxl.dtypes import precision_name, torch_dtype
from nuwaxl.engine.base import EngineNetworks, NetworkSpec
from nuwaxl.engine.graphs import GraphedEngine
from nuwaxl.engine.registry import TORCH_MODES, TorchMode
from nuwaxl.errors import UserError, option
from nuwaxl.files import write_bytes
from nuwaxl.iospec import IOSpec
from nuwaxl.models import frame_attention
from nuwaxl.models.layers import fused_projections, position_tables, temporal_attention_kernel, temporal_conv_layout
from nuwaxl.models.unet import matmul_epilogues

# How this backend's engines run as CUDA graphs (engine.graphs.GraphedEngine); said by the manifest and `doctor`.
CUDA_GRAPHS = "captured with torch.cuda.graph, one graph per batch shape (packages load with run_single_threaded)"

# The most elements one tensor may hold (registry protocol): none, PyTorch splits what cuDNN cannot index.
TENSOR_ELEMENTS_MAX = None


def status() -> dict:
    """What this backend's library is here (registry protocol)."""
    return {"library": "torch", "version": torch.__version__, "cuda": torch.cuda.is_available()}


# Dynamo compiles one graph per (block shape, batch size); the paper UNet has a few dozen such pairs, over
# Dynamo's default limit of 8 recompiles per code object (past it, a block would silently run eagerly).
RECOMPILE_LIMIT = 256


def compile_regions(module: nn.Module):
    """Regional compilation: torch.compile (static shapes, one graph per batch size) every repeated block of
    `models.networks.compile_regions()` in place, instead of the whole network; the rest runs eagerly (and is
    captured with the blocks under the *-cudagraph modes). A network without such blocks (the text encoder) is
    compiled whole. Returns what to call. Idempotent: networks share blocks."""
    from nuwaxl.models.networks import compile_regions as regions

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * RECOMPILE_LIMIT)
    compile_cache.load()
    blocks = [m for m in module.modules() if isinstance(m, regions())]
    if not blocks:
        return torch.compile(module, dynamic=False)
    for m in blocks:
        if getattr(m, "_compiled_call_impl", None) is None:
            m.compile(dynamic=False)
    return module


class CompileCache:
    """torch.compile's artifacts kept between processes (torch.compiler's save/load of cache artifacts): loaded
    once per process before the first compilation, saved at exit when this process compiled something new.
    Folder: $NUWAXL_COMPILE_CACHE, else ~/.cache/trt-nuwaxl/compile; one subfolder per torch version and GPU;
    empty NUWAXL_COMPILE_CACHE turns it off."""

    def __init__(self):
        self.loaded = False
        self.info: dict = {}

    def folder(self) -> Path | None:
        root = os.environ.get("NUWAXL_COMPILE_CACHE", str(Path.home() / ".cache" / "trt-nuwaxl" / "compile"))
        if not root:
            return None
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        return Path(root) / "".join(c if c.isalnum() or c in ".-" else "_" for c in f"{torch.__version__}-{gpu}")

    def load(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        folder = self.folder()
        if folder is None:
            return
        atexit.register(self.save)
        files = sorted(folder.glob("*.bin")) if folder.is_dir() else []
        for f in files:  # each file: what one process compiled that the ones before it had not
            try:
                torch.compiler.load_cache_artifacts(f.read_bytes())
            except Exception as e:  # a file from another build of torch, or damaged: compile instead
                warnings.warn(f"ignoring compile cache file {f} ({type(e).__name__}: {e})", stacklevel=2)
        self.info["loaded_files"] = len(files)

    def save(self) -> Path | None:
        """A new file with this process's artifacts, if it compiled a graph that the cache did not have (a
        process that only hit the cache would write the same artifacts again)."""
        from torch._dynamo.utils import counters

        folder = self.folder()
        if folder is None or not counters["inductor"]["fxgraph_cache_miss"]:
            return None
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return None
        data = saved[0]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.bin"
        write_bytes(path, memoryview(data))
        return path


compile_cache = CompileCache()


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA GPU is visible; use {option('device', 'cpu')}")
    return dev


def resolve_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """auto: fp16 on a GPU, fp32 on the CPU (where half precision is emulated and slow)."""
    if precision in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = torch_dtype(precision)
    if device.type == "cpu" and dtype != torch.float32:
        # Measured on 2 CPU cores, small preset, 31 frames: fp16 215 s, fp32 11 s (README "Using it").
        warnings.warn(f"precision {precision} on the CPU is about 19x slower than fp32 (no half-precision kernels); "
                      f"use {option('precision', 'fp32')} there", stacklevel=3)
    return dtype


def named_outputs(spec: IOSpec, out) -> dict[str, torch.Tensor]:
    """A module's or package's output (a tensor, or a tuple/list in the spec's order) by the spec's names."""
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    return {t.name: y for t, y in zip(spec.outputs, outs, strict=True)}


class TorchEngine:
    """A live module (any batch); `compiled`: its repeated blocks are compiled (`compile_regions`: one graph per
    block shape and batch size, kept between processes by `compile_cache`). Under the CUDA-graph torch modes it
    is wrapped in `GraphedEngine`."""

    spec = None  # live modules take any batch

    def __init__(self, module: nn.Module, spec: IOSpec, compiled: bool = False):
        self.io = spec
        self.names = [t.name for t in spec.inputs]
        self.module = module
        self.fn = compile_regions(module) if compiled else module

    @torch.inference_mode()
    def run(self, feeds, stream=None):
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            return named_outputs(self.io, self.fn(*(feeds[n] for n in self.names)))


# AOTInductor packages are compiled for batch >= 2 and a lone call is padded to 2 rows: with torch 2.13 a
# package exported with a dynamic batch gave wrong UNet outputs at batch 1 (relative error 1.5, exact at 2 and 4).
AOTI_MIN_BATCH = 2
# Static packages beside a network's dynamic-batch one, for the row counts where the time goes: "min" (a lone call:
# every autoregressive window and the coarse levels; padded to 2 rows it cost AR 50.6 s against 28.9 s for
# compile-cudagraph) and, for the per-step UNet, "max" (a whole level of a long video). Measured on the H200,
# paper unet_step (benchmarks/results/aoti-step-variants-h200-f529f71.json): 69 rows 180 ms per step through the
# dynamic package, 163 ms through a static one; 1 row 8.0 ms static.
STATIC_ROWS = {"unet_prepare": ("min",), "unet_step": ("min", "max"), "vae_encoder": ("min",),
               "vae_decoder": ("min",)}
# How packages are laid out; part of every AOTInductor stage's cache key. v2: the weights are not compiled into
# the package's .so (a 2 GB .so for the paper UNet) but kept once per network in NET.safetensors and handed to
# every package of that network as user-managed constants (one copy on the GPU); compiled with the largest batch
# as the size hint. v3: STATIC_ROWS packages; on a GPU, 2-D convolution weights channels-last (NHWC), as the live
# torch modes run them (paper unet_step, 1 row: 8.76 -> 8.0 ms per step). v4: TEMPORAL_CONV. v5: TEMPORAL_ATTENTION.
# v6: TEMPORAL_CONV per network (the T-KLVAE's "frames-as-matmul"). v7: TEMPORAL_ATTENTION per device (a Triton
# kernel on GPUs). v8: self-attention's q/k/v projections as one matrix product (`models.layers.fused_projections`),
# in every package: H200, paper unet_step, static fp16 packages, CUDA-graph replay, against v7 in the same run
# (benchmarks/results/step-variants-qkv-paper-h200-16793bf.json): 1 row 5.54 -> 5.32 ms (matmuls 1.44 -> 1.24 ms),
# 69 rows 140.77 -> 140.58 ms; outputs within 8.7e-4 of the live module either way. Tiny preset, fp32, our 2-core
# CPU: 3.37 -> 3.45 ms at 2 rows (within that machine's noise). v9: MATMUL_EPILOGUES. v10: the temporal attention's
# frame position encoding as a constant table of the package (`models.layers.position_tables`) instead of
# arange/exp/sin/cos ops computed inside the temporal LayerNorm's kernel (a candidate cause of that kernel's
# frames-innermost output and its copy, benchmarks/results/temporal-norm-copy-diagnosis-tiny-h200-eb5c389.txt). H200,
# paper unet_step, static fp16 packages, CUDA-graph replay, against v9 in the same run
# (benchmarks/results/step-variants-position-paper-h200-1ac0cd8.json): the three LayerNorm kernels that computed the
# encoding (3.60 ms at 69 rows) become plain LayerNorm + add kernels (2.14 ms); 69 rows 139.61 -> 136.99 ms (kernel time
# 137.94 -> 137.58 ms), 1 row 5.24 -> 5.22 ms; outputs within 9.3e-4 of the live module either way. The copies to
# row-major stay: the encoding's ops did not cause them. End to end (engines-aoti-paper-1024f-h200-03fb4ae.json): DoD
# 8.91 s, AR 19.28 s, on a machine where v9's step timed 2.7% slower than in v9's own run (8.81 s, 19.36 s).
PACKAGING = 10
# How each network's packages run temporal convolutions (`models.layers.TemporalConv.LAYOUTS`; networks not named
# here: "frames-as-height"). "frames-as-height": a (k, 1) 2-D convolution on the channels-last hidden state read as
# (B, L, H*W, C), instead of a Conv3d on (B, C, L, H, W) with layout copies around it. Measured on an H200 (paper
# unet_step, fp16 static packages, CUDA-graph replay, both layouts within 8.7e-4 of the live module;
# benchmarks/results/aoti-step-variants-h200-d590817.json): 1 row 8.01 -> 5.74 ms per step, 69 rows 164.0 ->
# 152.1 ms. Tiny preset, fp32 on our 2-core CPU: 7.5 -> 5.5 ms at 2 rows (aoti-step-variants-tiny-cpu-d590817.json).
# "frames-as-matmul" (the k frame-shifted copies side by side times one (k*C, C) matrix) for the T-KLVAE, whose
# 128-channel temporal convolutions at full resolution cuDNN runs in a slow Ampere kernel: H200, paper preset,
# dynamic fp16 packages against "frames-as-height" (benchmarks/results/temporal-conv-layouts-paper-h200-f9c5130.json):
# encoder 4 rows 20.21 -> 17.09 ms, 69 rows 352.6 -> 303.1 ms; decoder 4 rows 36.78 -> 34.12 ms, 69 rows 632.0 ->
# 614.5 ms. Not for the UNet, whose temporal convolutions run at low resolution in fast kernels already: 69 rows
# 149.0 -> 176.1 ms (the frame-shifted copies cost more), 1 row 5.79 -> 5.53 ms.
TEMPORAL_CONV = {"vae_encoder": "frames-as-matmul", "vae_decoder": "frames-as-matmul"}
# How the packages attend over frames (`models.layers.TemporalAttention.KERNELS`), per device type. Not a fused
# attention kernel (cuDNN's): its 64 x 128 tiles the L = 16 frames leave mostly empty. "math", matrix products over
# the frames of each token: H200, paper unet_step, static fp16 packages, CUDA-graph replay (benchmarks/results/
# step-variants-paper-h200-8bde77a.json): 69 rows 150.4 -> 147.6 ms (attention kernels 28.4 -> 10.2 ms, the batched
# products and softmax adding 14 ms), 1 row 5.77 -> 5.79 ms; "fused" (sums of products) was slower, 165.3 ms.
# "triton" on GPUs (one kernel per layer that keeps each token's scores in registers, `models.frame_attention`):
# against "math" in the same run (benchmarks/results/step-variants-triton-paper-h200-9647a06.json), 69 rows 151.2 ->
# 144.8 ms, 1 row 5.77 -> 5.53 ms; the 16 layers alone 10.1 -> 2.9 ms per 69-row step (memory floor 1.3 ms,
# frame-attention-paper-h200-9647a06.json). The CPU's packages keep "math": Triton compiles for GPUs.
TEMPORAL_ATTENTION = {"cuda": "triton"}
# What the UNet's transformer products compute in their epilogues in every package (`SpaceTimeTransformer.EPILOGUES`,
# `models.layers.fused_linear`): the feed-forward's GELU (in the batch-69 step separate memory-bound kernels over the
# 4C hidden features, 4.9 ms) and the residual additions after the feed-forward and the output projection as
# cuBLAS(Lt) epilogues. On CUDA cuBLASLt's GELU is the tanh approximation (within 5e-4 of the exact one); the parity
# gate measures the package against the live module. H200, paper unet_step, static fp16 packages, CUDA-graph replay,
# against "none" in the same run (benchmarks/results/step-variants-epilogues-paper-h200-c821a18.json): 69 rows 140.05
# -> 137.12 ms ("gelu") -> 135.98 ms ("gelu-residual"; addmm copies its C input first, 1.5 ms of copies), 1 row 5.31
# -> 5.26 ms; outputs within 9.3e-4 of the live module (8.7e-4 before).
MATMUL_EPILOGUES = "gelu-residual"


def package_temporal_conv(network: str) -> str:
    """The temporal convolution layout of `network`'s packages (`TEMPORAL_CONV`)."""
    return TEMPORAL_CONV.get(network, "frames-as-height")


def package_temporal_attention(device: torch.device) -> str:
    """The temporal attention kernel of packages compiled for `device` (`TEMPORAL_ATTENTION`; else "math")."""
    kernel = TEMPORAL_ATTENTION.get(device.type, "math")
    if kernel == "triton" and not frame_attention.available():
        warnings.warn("Triton is not installed, so the packages attend over frames with matrix products (about 4% "
                      "slower per UNet step on an H200); torch's CUDA wheels bring Triton", stacklevel=2)
        return "math"
    return kernel


def static_rows(name: str, spec: IOSpec) -> tuple[int, ...]:
    """The row counts for which network `name` gets a static package beside its main one."""
    wanted = {{"min": spec.batch_min, "max": spec.batch_max}[w] for w in STATIC_ROWS.get(name, ())}
    if spec.batch_max <= max(spec.batch_min, AOTI_MIN_BATCH):  # the main package is itself static, at batch_max
        wanted.discard(spec.batch_max)
    return tuple(sorted(wanted))


def package_paths(directory, name: str, spec: IOSpec | None = None) -> dict[str, Path]:
    """The files of network `name`: its package (dynamic batch), its weights and its static packages
    (`rows<N>`, `static_rows`; spec None: whichever exist)."""
    folder = Path(directory) / "torch"
    paths = {"package": folder / f"{name}.pt2", "weights": folder / f"{name}.safetensors"}
    rows = static_rows(name, spec) if spec is not None else \
        sorted(int(p.name.split(".rows")[1].split(".")[0]) for p in folder.glob(f"{name}.rows*.pt2"))
    for n in rows:
        paths[f"rows{n}"] = folder / f"{name}.rows{n}.pt2"
    return paths


def shares_libstdcxx(compiler: str) -> bool:
    """Does `compiler` link the shared libstdc++ (the one this process already has loaded)? A toolchain without
    it links libstdc++ statically into the package's .so and exports its symbols; the loaded package then mixes
    two C++ runtimes and crashes (H200 image, CXX=/opt/gcc/bin/g++: SIGSEGV in std::regex inside
    `aoti_load_package`, benchmarks/results/aoti-load-crash-h200.md)."""
    try:
        found = subprocess.run([compiler, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return os.path.isabs(found) and os.path.exists(found)


@functools.lru_cache(maxsize=1)
def aoti_compiler() -> str:
    """The C++ compiler for AOTInductor: $CXX (Inductor's choice) if it links the shared libstdc++, else the
    first of g++, c++, clang++ that does, with a warning."""
    wanted = os.environ.get("CXX") or "g++"
    for name in dict.fromkeys([wanted, "g++", "c++", "clang++"]):
        path = shutil.which(name)
        if path and shares_libstdcxx(path):
            if name != wanted:
                warnings.warn(f"the C++ compiler {wanted} links libstdc++ statically, so AOTInductor packages made "
                              f"with it crash when loaded; compiling with {path} instead", stacklevel=2)
            return path
    raise UserError(f"no C++ compiler that links the shared libstdc++ was found (tried {wanted}, g++, c++, "
                    "clang++); AOTInductor needs one: install g++, or set CXX to one")


def aoti_compile(program, package: Path) -> None:
    """torch.export program -> AOTInductor package without its weights (`write_weights` stores them), with a
    compiler whose packages load (`aoti_compiler`)."""
    from torch._inductor import config

    with config.patch({"cpp.cxx": (aoti_compiler(),), "aot_inductor.package_constants_in_so": False}):
        torch._inductor.aoti_compile_and_package(program, package_path=str(package))


def program_weights(program, packages: list[Path], device: torch.device) -> dict[str, torch.Tensor]:
    """The constants (parameters, buffers, lifted tensors) of an exported program that its compiled `packages`
    ask for, by the names they ask for them (the paper UNet's prepare part needs 8% of its weights)."""
    wanted = {k for p in packages for k in load_package(p, device).get_constant_fqns()}
    state = {**program.state_dict, **{k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}}
    missing = sorted(wanted - state.keys())
    if missing:
        raise RuntimeError(f"AOTInductor packages {[p.name for p in packages]} ask for constants {missing[:3]} that "
                           "the exported program does not have")
    return {k: state[k] for k in sorted(wanted)}


def _channels_last(v: torch.Tensor) -> bool:
    return v.dim() == 4 and not v.is_contiguous() and v.is_contiguous(memory_format=torch.channels_last)


def write_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """The weights in the memory layout the packages were compiled for: row-major, or channels-last (NHWC) for
    2-D convolution weights on a GPU, stored as their NHWC permutation and named in the file's metadata."""
    from safetensors.torch import save_file

    odd = [k for k, v in weights.items() if not v.is_contiguous() and not _channels_last(v)]
    if odd:  # the package was compiled for these strides; a dense copy would be misread
        raise UserError(f"cannot store weights {odd[:3]} outside the AOTInductor package: neither row-major nor "
                        "channels-last")
    nhwc = sorted(k for k, v in weights.items() if _channels_last(v))
    dense = {k: (v.permute(0, 2, 3, 1) if k in nhwc else v).detach().to("cpu", copy=True)  # copies: no tied ones
             for k, v in weights.items()}
    tmp = path.with_suffix(".tmp")  # a crash leaves no half-written weights under the final name
    save_file(dense, str(tmp), metadata={"channels_last": ",".join(nhwc)})
    os.replace(tmp, path)


def read_weights(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """`write_weights`' file on `device`, each tensor in the layout it was written from."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        nhwc = set(filter(None, (f.metadata() or {}).get("channels_last", "").split(",")))
        return {k: f.get_tensor(k).permute(0, 3, 1, 2) if k in nhwc else f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def load_package(path: Path, device: torch.device):
    """One AOTInductor package, ready to run. On a GPU, torch's C++ loader directly, after checking the package's
    compute capability: `torch._inductor.aoti_load_package` first compiles test programs for every CPU vector
    ISA to compare with the package's (40-54 s of compiler runs per process on the H200 machine, with the loader
    itself taking milliseconds; benchmarks/results/engines-fast-path-h200.md), which only matters for CPU code.
    run_single_threaded: no cross-thread synchronisation inside the runner (its event waits cannot be captured:
    "operation not permitted when stream is capturing"), so CUDA graphs can record it."""
    if device.type != "cuda":
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
    built = package_metadata(path).get("AOTI_COMPUTE_CAPABILITY")
    major, minor = torch.cuda.get_device_capability(device)
    if built and built != str(10 * major + minor):
        raise UserError(f"{path} was compiled for CUDA compute capability {built}, this GPU has {major}{minor}; "
                        f"rebuild on this GPU with trt-nuwaxl build --backend torch --force")
    return LoadedPackage(torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1,
                                                               -1 if device.index is None else device.index))


class LoadedPackage:
    """A package opened by torch's C++ loader, called as torch's `AOTICompiledModel` calls it for flat tensor
    inputs and outputs. Not that class itself: its module imports Dynamo and Inductor, which a process that only
    runs packages does not otherwise need (1 s on our CPU machine; the H200 machine's imports are about 4.7x
    slower: torch itself took 4.5 s there, 0.95 s here)."""

    def __init__(self, loader):
        self.loader = loader

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        return self.loader.boxed_run(list(args))

    def get_constant_fqns(self) -> list[str]:
        return self.loader.get_constant_fqns()

    def load_constants(self, constants: dict[str, torch.Tensor], *, check_full_update: bool,
                       user_managed: bool = False) -> None:
        self.loader.load_constants(constants, False, check_full_update, user_managed)  # False: the active buffer


def package_metadata(path: Path) -> dict[str, str]:
    """What a package records about the machine it was compiled for (AOTI_DEVICE_KEY, AOTI_COMPUTE_CAPABILITY...)."""
    return torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(str(path), "model")


class AotiEngine:
    """An AOTInductor network: its package (dynamic batch), static packages for some row counts
    (`STATIC_ROWS`), and the weights they all share (loaded once onto the device, handed to each package as
    user-managed constants). Compiled ahead of time by `trt-nuwaxl build --backend torch`."""

    def __init__(self, paths: dict[str, Path], spec: IOSpec, device: torch.device):
        for what in paths:
            if not paths[what].is_file():
                hint = " (packages from an earlier trt-nuwaxl held their weights inside)" if what == "weights" else ""
                raise UserError(f"AOTInductor {what} missing: {paths[what]}{hint}; rebuild with trt-nuwaxl build "
                                f"--backend torch --force --out {paths[what].parent.parent}")
        self.spec = spec
        self.names = [t.name for t in spec.inputs]
        self.device = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index \
            is None else device
        self.weights = read_weights(paths["weights"], self.device)  # owned here, used by every package
        self.fn = self._load(paths["package"])
        self.static = {int(k.removeprefix("rows")): self._load(p) for k, p in paths.items() if k.startswith("rows")}

    def _load(self, package: Path):
        fn = load_package(package, self.device)
        wanted = fn.get_constant_fqns()
        missing = [k for k in wanted if k not in self.weights]
        if missing:
            raise UserError(f"{package} needs weights {missing[:3]} that {package.with_suffix('')}.safetensors lacks;"
                            f" rebuild with trt-nuwaxl build --backend torch --force")
        fn.load_constants({k: self.weights[k] for k in wanted}, check_full_update=True, user_managed=True)
        return fn

    @torch.inference_mode()
    def run(self, feeds, stream=None):
        batch = next(iter(feeds.values())).shape[0]
        self.spec.check_batch(batch)
        fn = self.static.get(batch, self.fn)
        pad = AOTI_MIN_BATCH - batch if fn is self.fn and batch < AOTI_MIN_BATCH <= self.spec.batch_max else 0
        # dense row-major inputs, as the package was compiled for (a view such as a transpose would be misread)
        args = [feeds[n].contiguous() if not pad else torch.cat([feeds[n]] + [feeds[n][:1]] * pad)
                for n in self.names]
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            out = named_outputs(self.spec, fn(*args))
        return {k: v[:batch] for k, v in out.items()} if pad else out


def load(directory, name: str, spec: IOSpec, device: torch.device) -> AotiEngine:
    """The engine directory's network `name` (registry protocol)."""
    return AotiEngine(package_paths(directory, name, spec), spec, device)


def files(directory, name: str) -> list[str]:
    """The network's files in a built directory (registry protocol)."""
    return [p.relative_to(Path(directory)).as_posix() for p in package_paths(directory, name).values()
            if p.is_file()]


def channels_last_convs(module: nn.Module) -> nn.Module:
    """2-D convolution weights in channels-last (NHWC) layout, cuDNN's preferred one for fp16; same results."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return module


def torch_networks(models, device: str | None = None, precision: str | None = None, resolution: int | None = None,
                   torch_mode: TorchMode = "eager") -> EngineNetworks:
    """Live-module engines over a NuwaModels bundle (from a checkpoint or a preset)."""
    from nuwaxl.iospec import io_specs
    from nuwaxl.models.networks import networks

    dev = resolve_device(device)
    mode = torch_mode
    if mode not in TORCH_MODES:
        raise UserError(f"unknown torch mode {mode!r}; use one of {', '.join(TORCH_MODES)}")
    if mode.endswith("cudagraph") and dev.type != "cuda":
        raise UserError(f"torch mode {mode!r} needs a CUDA device; use {option('device', 'cuda')} or "
                        f"{option('torch_mode', 'eager')}")
    dtype = resolve_dtype(precision, dev)
    config = models.config if resolution is None else models.config.with_resolution(resolution)
    models = models.to(device=dev, dtype=dtype).eval()
    if dev.type == "cuda":  # NHWC conv weights: a lone paper-UNet call 14.7 -> 9.7 ms under CUDA graphs, batch 69
        channels_last_convs(models)  # unchanged (benchmarks/results/EXPERIMENTS.md)
    specs = io_specs(config, precision_name(dtype), max_rows=1)  # names and dtypes only: live modules take any batch
    compiled, graphed = mode in ("compile", "compile-cudagraph"), mode.endswith("cudagraph")
    engines = {}
    for name, module in networks(models).items():
        engine = TorchEngine(module, specs[name], compiled)
        engines[name] = GraphedEngine(engine, specs[name]) if graphed else engine
    graphs = "on" if graphed else f"off: torch mode {mode!r} (the *-cudagraph modes capture graphs)"
    return EngineNetworks(engines, models.tokenizer, NetworkSpec(config, dev, dtype, None, f"torch-{mode}",
                                                                  models.sampling, models.trained_on, graphs))


def check_build(device: torch.device, precision: str) -> None:
    """Can this machine compile AOTInductor packages? (registry protocol; before any work is done)"""
    if precision == "fp16" and device.type == "cpu":
        raise UserError(f"fp16 AOTInductor packages need a CUDA device; use {option('precision', 'fp32')} or "
                        f"{option('device', 'cuda')}")


def build_network(job, name: str, module, reference, spec: IOSpec) -> dict:
    """The AOTInductor stage (registry protocol): torch.export with a dynamic batch, compile into a package,
    load it back and run the parity gate on it. Reused when its cache key matches."""
    import platform
    import time

    from nuwaxl.engine.stage import cached, check_parity, parity_text, stage_key
    from nuwaxl.export.onnx_export import dynamic_shapes, write_manifest

    paths = package_paths(job.out, name, spec)
    man_path = job.out / "torch" / f"{name}.json"
    where = torch.cuda.get_device_name(job.device) if job.device.type == "cuda" else platform.processor() or "cpu"
    key = stage_key(checkpoint=job.weights_id, spec=spec.to_dict(), precision=job.precision, packaging=PACKAGING,
                    torch=torch.__version__, device=where, parity=job.parity[name])
    if cached(man_path, key, job.force) and all(p.is_file() for p in paths.values()):
        job.log(f"{name}: AOTInductor package reused")
        return {"packages": files(job.out, name)}
    names = [t.name for t in spec.inputs]
    dtype = next(module.parameters()).dtype
    attention = package_temporal_attention(job.device)
    t0 = time.perf_counter()
    lowest = max(spec.batch_min, AOTI_MIN_BATCH)
    dynamic = spec.batch_max > lowest  # a package for a single batch size (1 or 2 rows) is static
    batch = torch.export.Dim("batch", min=lowest, max=spec.batch_max) if dynamic else None
    # Compiled with the largest batch as the example: Inductor picks kernel configurations for the example's
    # sizes, and the largest batches (a whole level of a long video) are where the time goes.
    sample = job.sample(spec, spec.batch_max, dtype)
    with torch.no_grad(), temporal_conv_layout(module, package_temporal_conv(name)), \
            temporal_attention_kernel(module, attention), fused_projections(module), \
            matmul_epilogues(module, MATMUL_EPILOGUES), position_tables(module, job.frames_per_call):
        if job.device.type == "cuda":  # the layout the live torch modes run (PACKAGING v3), the (k, 1) temporal
            channels_last_convs(module)  # convolutions too; the weights file keeps it
        program = torch.export.export(module, tuple(sample[n] for n in names),
                                      dynamic_shapes=dynamic_shapes(module, spec, batch))
        aoti_compile(program, paths["package"])
        for rows in static_rows(name, spec):  # the same module and weights: its constants have the same names
            one = job.sample(spec, rows, dtype)
            aoti_compile(torch.export.export(module, tuple(one[n] for n in names)), paths[f"rows{rows}"])
        write_weights(program_weights(program, [p for k, p in paths.items() if k != "weights"],
                                      job.device), paths["weights"])
    del program, sample
    compile_s = round(time.perf_counter() - t0, 2)
    engine = AotiEngine(paths, spec, job.device)
    # every package is measured: the dynamic one at its smallest batch if no asked-for batch reaches it
    asked = job.parity[name]
    extra = [lowest] if dynamic and asked and all(b in engine.static or b < lowest for b in asked) else []
    result = job.measure_parity(name, engine.run, reference, spec, job.device, f"aoti-{job.device.type}",
                                batches=sorted({*asked, *extra}))
    write_manifest(man_path, {"network": name, "stage_key": key, "source_checkpoint_sha256": job.weights_id,
                              "precision": job.precision, "io_spec": spec.to_dict(), "compile_s": compile_s,
                              "packaging": PACKAGING, "temporal_conv": package_temporal_conv(name),
                              "temporal_attention": attention, "matmul_epilogues": MATMUL_EPILOGUES,
                              "position_encoding": "table", "device": str(job.device),
                              "torch": torch.__version__, "parity": result})
    check_parity(name, result, man_path)
    job.log(f"{name}: AOTInductor package compiled in {compile_s} s, {parity_text(result)}")
    return {"packages": files(job.out, name)}


def doctor(gpu: bool) -> dict[str, dict]:
    """This backend's rows in `trt-nuwaxl doctor` (registry protocol): the live torch modes and the packages."""
    compiler = shutil.which("g++") or shutil.which("c++")
    no_gpu = "no CUDA GPU is visible"
    can_compile = gpu or compiler is not None
    why_compile = None if can_compile else "no GPU and no C++ compiler for Inductor's CPU code"
    no_graphs = "no: torch mode without graphs"
    live = "torch.cuda.graph around live modules, one per batch shape"
    return {"torch-eager": {"usable": True, "why": None, "cuda_graphs": no_graphs},
            "torch-compile": {"usable": can_compile, "why": why_compile, "cuda_graphs": no_graphs},
            "torch-cudagraph": {"usable": gpu, "why": None if gpu else no_gpu, "cuda_graphs": live},
            "torch-compile-cudagraph": {"usable": gpu, "why": None if gpu else no_gpu, "cuda_graphs": live},
            "torch-aoti": {"usable": can_compile, "why": why_compile, "cuda_graphs": CUDA_GRAPHS}}
