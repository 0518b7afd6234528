"""Prompt encoder: transformers' CLIP text-encoder architecture with an offline byte-level BPE tokenizer.

The tokenizer is a `tokenizers` JSON document; every checkpoint embeds the one it was trained with, so loading
never touches a model hub. A default tokenizer ships in nuwaxl/assets (see `train_tokenizer`).
"""

from __future__ import annotations

from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from nuwaxl.config import TextConfig

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"


def train_tokenizer(lines: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: any text tokenizes (unknown words fall back to bytes); deterministic for the same lines."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([line.lower() for line in lines], trainer)
    return tok


def default_tokenizer_json() -> str:
    return resources.files("nuwaxl").joinpath("assets/tokenizer.json").read_text(encoding="utf-8")


class PromptTokenizer:
    """Lower-cases, adds BOS/EOS, pads with PAD and truncates to `max_length` ids (CLIP's 77)."""

    def __init__(self, tokenizer_json: str, max_length: int):
        self.json = tokenizer_json
        self.max_length = max_length
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.bos, self.eos, self.pad = (self.tok.token_to_id(t) for t in (BOS, EOS, PAD))
        if None in (self.bos, self.eos, self.pad):
            raise ValueError(f"tokenizer lacks one of the special tokens {BOS}, {EOS}, {PAD}")
        self.tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, self.bos), (EOS, self.eos)])
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(pad_id=self.pad, pad_token=PAD, length=max_length)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """list of P prompts -> (P, max_length) int64 token ids."""
        encs = self.tok.encode_batch([p.lower() for p in prompts])
        return torch.tensor([e.ids for e in encs], dtype=torch.int64)


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


def default_tokenizer_corpus() -> list[str]:
    text = resources.files("nuwaxl").joinpath("assets/tokenizer_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


if __name__ == "__main__":  # regenerate nuwaxl/assets/tokenizer.json from the corpus beside it
    path = resources.files("nuwaxl").joinpath("assets/tokenizer.json")
    train_tokenizer(default_tokenizer_corpus(), vocab_size=4096).save(str(path))
    print(f"wrote {path}")
