"""Precision names -> torch dtypes: the one mapping, shared by export, engines and the runtime."""

from __future__ import annotations

import torch

from nuwaxl.errors import UserError
from nuwaxl.iospec import ELEMENT_TYPES

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}


def torch_dtype(precision: str) -> torch.dtype:
    """fp32 / fp16 / bf16 -> the torch dtype."""
    if precision not in ELEMENT_TYPES:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(ELEMENT_TYPES)}")
    return TORCH_DTYPES[ELEMENT_TYPES[precision]]


def precision_name(dtype: torch.dtype) -> str:
    """The inverse: torch.float16 -> "fp16"."""
    return next(p for p in ELEMENT_TYPES if torch_dtype(p) == dtype)
