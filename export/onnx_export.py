"""PyTorch -> ONNX for the four networks, from their IOSpec, with graph cleanup, external data for models over
2 GB, and a manifest that records the source, the spec, the opset, library versions and the measured parity.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from nuwaxl.files import write_text
from nuwaxl.iospec import BATCH, IOSpec

OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GB: keep weights beside the graph well before that


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def onnx_sha256(path: Path) -> str:
    """Hash of the graph and, if present, its external weights file."""
    h = hashlib.sha256(bytes.fromhex(sha256_file(path)))
    data = path.with_name(path.name + ".data")
    if data.exists():
        h.update(bytes.fromhex(sha256_file(data)))
    return h.hexdigest()


def sample_inputs(spec: IOSpec, batch: int, device: torch.device, dtype: torch.dtype, vocab_size: int,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh random inputs of the spec's shapes: noise for floats, a binary mask, valid timesteps and token ids."""
    feeds = {}
    for t in spec.inputs:
        shape = t.concrete(batch)
        if t.name == "timesteps":
            x = torch.randint(0, 1000, shape, generator=generator)
        elif t.name == "input_ids":
            x = torch.randint(0, vocab_size, shape, generator=generator)
        elif t.name == "mask":
            x = (torch.rand(shape, generator=generator) > 0.5).to(dtype)
        else:
            x = torch.randn(shape, generator=generator).to(dtype)
        feeds[t.name] = x.to(device)
    return feeds


@contextlib.contextmanager
def _quiet_op_registry():
    """torch.onnx logs "torchvision is not installed. Skipping torchvision::..." once per torchvision op it knows
    (16 lines per build); none of our networks uses torchvision."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        yield
    finally:
        registry.setLevel(level)


def dynamic_shapes(module: nn.Module, spec: IOSpec, batch) -> tuple:
    """torch.export's dynamic_shapes for `module(*inputs)`: the batch axis (a `Dim`, or None for static) of every
    input, structured like the signature (a `*prepared` parameter takes the remaining inputs as one tuple)."""
    entry = {0: batch} if batch is not None else None
    params = list(inspect.signature(module.forward).parameters.values())
    fixed = [p for p in params if p.kind != p.VAR_POSITIONAL]
    rest = len(spec.inputs) - len(fixed)
    return tuple([entry] * len(fixed)) + ((tuple([entry] * rest),) if rest else ())


def ort_attention() -> dict:
    """A translation of `F.scaled_dot_product_attention` to ONNX Runtime's fused `com.microsoft.MultiHeadAttention`
    (query as (N, S, heads * d_head); keys and values so too where the graph makes them by a head split, else as
    (N, heads, S_ctx, d_head), a layout that op also accepts):
    for graphs that only ONNX Runtime runs (TensorRT's parser does not know the op)."""
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript import opset18 as op

    param = OpSchema.FormalParameter
    schema = OpSchema("MultiHeadAttention", "com.microsoft", 1,
                      inputs=[param(n, "T") for n in ("query", "key", "value")], outputs=[param("output", "T")],
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
                      attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "")])
    mha = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention", schema)

    def _sequence_major(t, packed):
        """Keys / values made in the graph by a head split, Transpose(perm 0,2,1,3) of (N, S, heads, d_head): that
        transpose's input packed as (N, S, heads * d_head), so no transpose runs (self-attention); the others
        (keys and values fed to the graph, already (N, heads, S_ctx, d_head)) as they are."""
        producer = t.producer()
        split = producer is not None and producer.op_type == "Transpose" and \
            list(producer.attributes["perm"].value) == [0, 2, 1, 3]
        if not split:
            return t
        return op.Reshape(producer.inputs[0], packed)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or is_causal or scale is not None:
            raise NotImplementedError("ort_attention translates unmasked, unscaled attention only")
        heads, d_head = query.shape[1], query.shape[3]
        packed = op.Constant(value_ints=[0, 0, heads * d_head])
        q = op.Reshape(op.Transpose(query, perm=[0, 2, 1, 3]), packed)
        out = mha(q, _sequence_major(key, packed), _sequence_major(value, packed), num_heads=heads)
        return op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, d_head])), perm=[0, 2, 1, 3])

    return {torch.ops.aten.scaled_dot_product_attention.default: sdpa}


def export_onnx(module: nn.Module, spec: IOSpec, path: Path, sample: dict[str, torch.Tensor],
                translations: dict | None = None) -> dict:
    """Export with a dynamic batch axis; returns facts for the manifest. `translations`: torch.onnx's
    custom_translation_table (for example `ort_attention()`)."""
    names = [t.name for t in spec.inputs]
    dynamic = spec.batch_max > spec.batch_min
    batch = torch.export.Dim(BATCH, min=spec.batch_min, max=spec.batch_max) if dynamic else None
    shapes = dynamic_shapes(module, spec, batch)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), _quiet_op_registry():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, tuple(sample[n] for n in names), dynamo=True, dynamic_shapes=shapes,
                                    input_names=names, output_names=[t.name for t in spec.outputs],
                                    opset_version=OPSET, verbose=False, custom_translation_table=translations)
        program.optimize()  # constant folding, dead-code elimination (onnxscript optimizer)
    external = param_bytes > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=external)
    onnx.shape_inference.infer_shapes_path(str(path), str(path))  # works on files of any size
    return {"opset": OPSET, "external_data": external, "param_bytes": param_bytes,
            "cleanup": ["onnxscript optimizer (constant folding, dead code)", "onnx shape inference"],
            "export_s": round(time.perf_counter() - t0, 2)}


def write_manifest(path: Path, manifest: dict) -> None:
    write_text(path, json.dumps(manifest, indent=2, sort_keys=True))


def library_versions() -> dict[str, str]:
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "numpy": np.__version__}
