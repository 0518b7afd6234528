"""Prompt encoder: transformers' CLIP text-encoder architecture (no hub downloads)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from nuwaxl.config import TextConfig


class PromptEncoder(nn.Module):
    """CLIP text transformer: (P, 77) token ids -> (P, 77, hidden) per-token embeddings p of the paper."""

    def __init__(self, cfg: TextConfig, eos_token_id: int = 1, pad_token_id: int = 2):
        super().__init__()
        self.cfg = cfg
        self.model = CLIPTextModel(CLIPTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_length, bos_token_id=0, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state
