"""Offline byte-level BPE prompt tokenizer (CLIP-style: BOS ... EOS, padded to 77 ids).

A `tokenizers` JSON document; every checkpoint and engine directory carries the one it was trained with, so
nothing is fetched from a model hub. A default ships in nuwaxl/assets (regenerate: python -m nuwaxl.tokenizer).
"""

from __future__ import annotations

import re
from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"


def words(text: str) -> list[str]:
    """The words of a prompt as the weights' vocabulary records them: lower case, letters, digits, apostrophes."""
    return re.findall(r"[a-z0-9']+", text.lower())


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
        self.raw = Tokenizer.from_str(tokenizer_json)  # no padding, no truncation: for counting tokens
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

    def count(self, prompt: str) -> int:
        """Tokens of `prompt` before truncation, BOS and EOS included."""
        return len(self.raw.encode(prompt.lower()).ids) + 2

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """list of P prompts -> (P, max_length) int64 token ids."""
        encs = self.tok.encode_batch([p.lower() for p in prompts])
        return torch.tensor([e.ids for e in encs], dtype=torch.int64)


def default_tokenizer_corpus() -> list[str]:
    text = resources.files("nuwaxl").joinpath("assets/tokenizer_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


if __name__ == "__main__":  # regenerate nuwaxl/assets/tokenizer.json from the corpus beside it
    path = resources.files("nuwaxl").joinpath("assets/tokenizer.json")
    train_tokenizer(default_tokenizer_corpus(), vocab_size=4096).save(str(path))
    print(f"wrote {path}")
