"""Factories for ``layerwise analyze --model/--data/--loss`` on zoo models, as a user writes
them: a module with functions that build the model and return the batches."""

from __future__ import annotations

from typing import Any

import torch

from .cases import CASES, causal_lm_loss

__all__ = ["causal_lm_loss", "gpt2", "labelled_token_batches", "llama", "token_batches"]

_BY_NAME = {case.name: case for case in CASES}


def gpt2() -> torch.nn.Module:
    """Hugging Face GPT-2 (tiny, random init), its ``lm_head`` tied to ``transformer.wte``."""
    return _BY_NAME["gpt2-tied"].build()


def llama() -> torch.nn.Module:
    """A Llama-style decoder from ``transformers.LlamaConfig`` (tiny, random init)."""
    return _BY_NAME["llama"].build()


def token_batches() -> list[dict[str, torch.Tensor]]:
    """Four batches ``{"input_ids": [8, T]}``, as a tokenizer's collator gives them."""
    case = _BY_NAME["gpt2-tied"]
    return [case.batch(torch.Generator().manual_seed(seed)) for seed in range(4)]


def labelled_token_batches() -> list[Any]:
    """The batches of :func:`token_batches` with ``labels`` (the inputs: a causal LM shifts
    them itself), for the model's own ``.loss``, as the ``BatchEncoding`` (a ``UserDict``,
    not a dict) that a tokenizer returns."""
    from transformers import BatchEncoding

    return [BatchEncoding({**b, "labels": b["input_ids"]}) for b in token_batches()]
