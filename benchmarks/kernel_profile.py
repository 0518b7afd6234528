"""Where a GPU call spends its time: torch.profiler's CUDA kernels (every kernel of the process: cuDNN, cuBLAS,
ONNX Runtime's, AOTInductor's Triton kernels) summed per kernel and per category.
"""

from __future__ import annotations

from collections import defaultdict

import torch

# Kernel-name keywords per category, first match wins (Inductor's Triton kernels / cuDNN / cuBLAS / CUTLASS / ONNX
# Runtime kernel names). Inductor names a fused kernel after every op in it ("triton_poi_fused_convolution_add_..."
# is the pointwise epilogue of a convolution), so its prefixes come first: tem(plate) = a matmul, per(sistent) /
# red(uction) = norms and other reductions, poi(ntwise) = elementwise.
CATEGORIES = (("gemm", ("triton_tem",)),
              ("norm", ("triton_per", "triton_red", "norm", "Norm")),
              ("elementwise", ("triton_poi",)),
              ("attention", ("fmha", "flash", "attention", "Attention", "sdpa", "softmax", "Softmax")),
              ("conv", ("conv", "Conv", "fprop", "dgrad", "implicit", "cudnn", "nhwc", "nchw")),
              ("gemm", ("gemm", "Gemm", "cutlass", "cublas", "nvjet", "xmma", "sm90_")),
              ("transpose / copy", ("ranspose", "copy", "Copy", "Concat", "Slice", "Gather")),
              ("elementwise", ("lementwise", "Binary", "Unary", "Sigmoid", "Erf", "Add", "Mul", "Div", "Cast",
                               "vectorized", "elementwise")))


def category(kernel: str) -> str:
    return next((c for c, words in CATEGORIES if any(w in kernel for w in words)), "other")


def kernel_profile(run, x, calls: int = 3, top: int = 15) -> dict:
    """Per-category and top kernels, GPU milliseconds per call, of `calls` plain runs of `run(x)`."""
    from torch.profiler import ProfilerActivity, profile

    run(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run(x)
        torch.cuda.synchronize()
    per_kernel = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name] += e.device_time / 1e3 / calls
    per_category = defaultdict(float)
    for name, ms in per_kernel.items():
        per_category[category(name)] += ms
    largest = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return {"gpu_ms_per_call": round(sum(per_kernel.values()), 2),
            "by_category_ms": {k: round(v, 2) for k, v in sorted(per_category.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[name[:140], round(ms, 3)] for name, ms in largest], "kernels": len(per_kernel)}
