"""Does an AOTInductor package compiled for CUDA load on this machine? (issue "Engines are the fast path", point 3)

    python benchmarks/aoti_load_check.py compile lin /tmp/lin.pt2
    python benchmarks/aoti_load_check.py load lin /tmp/lin.pt2

`compile` exports and packages one small module (`lin`, `lin32`: nn.Linear fp16 / fp32; `emb`: nn.Embedding;
`clip-eager`, `clip-sdpa`: a 2-layer CLIP text encoder) with a dynamic batch; `load` opens it in a fresh process and
runs it (`load-after-eager`: after an eager matmul and convolution).
Results: benchmarks/results/aoti-load-crash-h200.md."""
import faulthandler
import os
import sys

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

stage, which, pt2 = sys.argv[1:4]
if os.environ.get("NO_FAULTHANDLER") != "1":
    faulthandler.enable()


class Clip(nn.Module):
    def __init__(self, attn):
        super().__init__()
        cfg = CLIPTextConfig(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                             pad_token_id=2)
        cfg._attn_implementation = attn
        self.m = CLIPTextModel(cfg)

    def forward(self, ids):
        return self.m(input_ids=ids).last_hidden_state


if stage == "compile":
    net = {"emb": lambda: nn.Embedding(4096, 128), "lin": lambda: nn.Linear(128, 128),
           "lin32": lambda: nn.Linear(128, 128), "clip-eager": lambda: Clip("eager"),
           "clip-sdpa": lambda: Clip("sdpa")}[which]()
    dtype = torch.float32 if which == "lin32" else torch.float16
    net = net.cuda().to(dtype).eval()
    ids = (torch.randn(2, 77, 128, device="cuda", dtype=dtype) if which.startswith("lin")
           else torch.randint(0, 4096, (2, 77), device="cuda"))
    with torch.no_grad():
        prog = torch.export.export(net, (ids,), dynamic_shapes=({0: torch.export.Dim("b", min=2, max=69)},))
        torch._inductor.aoti_compile_and_package(prog, package_path=pt2)
    print(which, "compiled", flush=True)
else:  # load; load-after-eager: an eager CUDA matmul and convolution first (cuBLAS and cuDNN initialized);
    # IMPORT_BUILD=1: after importing what `nuwaxl.build` imports
    if os.environ.get("IMPORT_BUILD") == "1":
        import nuwaxl.build  # noqa: F401
    if stage == "load-after-eager":
        a = torch.randn(64, 64, device="cuda")
        torch.nn.functional.conv2d(a[None, None], torch.randn(1, 1, 3, 3, device="cuda"))
        torch.cuda.synchronize()
        print(which, "eager", float((a @ a).sum()) != 0, flush=True)
    fn = torch._inductor.aoti_load_package(pt2)
    print(which, "loaded", flush=True)
    x = (torch.randn(3, 77, 128, device="cuda", dtype=torch.float32 if which == "lin32" else torch.float16)
         if which.startswith("lin") else torch.randint(0, 4096, (3, 77), device="cuda"))
    print(which, "ran", tuple(fn(x).shape), flush=True)
