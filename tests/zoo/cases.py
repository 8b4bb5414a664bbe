"""The model zoo as data: one :class:`ZooCase` per architecture users bring.

Every case is a tiny, randomly initialised configuration (no network, no pretrained
weights): a factory, a batch maker, a mean loss ``loss(model, batch)`` (a
:class:`~layerwise.sensitivity.CrossEntropy` loss object, so the Gauss-Newton rule runs
too), and what grouping by depth must find (group names input to output, the head's
parameters). Three kinds:

* **replicas** of torchvision's and timm's models (:mod:`tests.zoo.replicas`): the same
  parameter names and computation, torch only, so they run everywhere;
* **Hugging Face** models built from ``transformers`` configs (BERT with a padding mask,
  GPT-2 with its ``lm_head`` tied to ``wte``, a Llama-style decoder), which the dev extra
  installs;
* the **real** torchvision and timm models, which need the ``zoo`` extra and a torch build
  torchvision was compiled against; the tests skip them, with the reason, where they cannot
  be imported (see the README).

The losses call the models as users do: attention through ``F.scaled_dot_product_attention``
(the estimator selects its twice-differentiable math backend itself), BERT with a padding
mask (per-example statistics fall back to micro-batches by themselves).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from layerwise.sensitivity import CrossEntropy

from . import replicas

__all__ = ["CASES", "ZooCase", "missing"]

CLASSES, VOCAB, SEQ = 5, 50, 10


@functools.cache
def missing(module: str) -> str | None:
    """Why ``module`` cannot be imported here, or None. Any exception counts: torchvision
    built for another torch raises ``RuntimeError`` (or worse) at import, not ImportError."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install is a reason to skip, not a crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{module} cannot be imported here ({type(exc).__name__}: {first[:160]})"
    return None


@dataclass(frozen=True)
class ZooCase:
    """One architecture: ``build()`` a fresh seeded model, ``batch(generator)``, the mean
    ``loss(model, batch)``; ``groups`` the depth grouping's names (input to output) with
    ``head=`` patterns ``head`` (None: the default head), ``head_params`` the head group's
    parameters; ``requires`` the modules it imports; ``estimator`` the estimate options it
    needs beyond the defaults, with ``why``; ``failing_rules`` the engine rules known to fail
    on it today, each with the reason (the tests expect the failure, strictly)."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Any]
    loss: Callable[[nn.Module, Any], Tensor]
    groups: tuple[str, ...]
    head_params: tuple[str, ...]
    head: Any = None
    requires: tuple[str, ...] = ()
    estimator: dict[str, Any] = field(default_factory=dict)
    why: str = ""
    failing_rules: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name

    def skip_reason(self) -> str | None:
        """Why this case cannot run here (a module it needs is missing), or None."""
        return next((r for r in map(missing, self.requires) if r), None)


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    @functools.wraps(make)
    def build() -> nn.Module:
        torch.manual_seed(0)
        return make()

    return build


# -- batches and losses ---------------------------------------------------------------------
def _images(size: int) -> Callable[[torch.Generator], tuple[Tensor, Tensor]]:
    def make(g: torch.Generator) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, CLASSES, (8,), generator=g)
        return torch.randn(8, 3, size, size, generator=g), labels

    return make


def _image_logits(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return model(batch[0])


#: Mean cross-entropy of ``model(images)`` against ``labels``, as a loss object.
image_loss = CrossEntropy(_image_logits, lambda batch: batch[1])


def _padded_text(g: torch.Generator) -> dict[str, Tensor]:
    ids = torch.randint(1, VOCAB, (8, SEQ), generator=g)
    lengths = torch.randint(4, SEQ + 1, (8,), generator=g)
    lengths[0] = SEQ
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    labels = torch.randint(0, CLASSES, (8,), generator=g)
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def _classifier_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


#: Mean cross-entropy of a sequence classifier's ``.logits`` against ``labels``.
classifier_loss = CrossEntropy(_classifier_logits, lambda batch: batch["labels"])


def _tokens(g: torch.Generator) -> dict[str, Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (8, SEQ), generator=g)}


def _next_token_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"]).logits[:, :-1]


#: Mean next-token cross-entropy of a causal language model's ``.logits`` [N, T, V].
causal_lm_loss = CrossEntropy(_next_token_logits, lambda batch: batch["input_ids"][:, 1:])


# -- models ---------------------------------------------------------------------------------
def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=SEQ, num_labels=CLASSES,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=SEQ,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _tv_resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=CLASSES)


def _timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=16, patch_size=4, num_classes=CLASSES, embed_dim=16, depth=2, num_heads=2
    )


def _timm_resnet18() -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=CLASSES)


def _timm_resnetv2() -> nn.Module:
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(
        layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), num_classes=CLASSES, stem_chs=8,
        preact=True, basic=True, norm_layer="batchnorm",
    )  # fmt: skip


RESNET_BLOCKS = tuple(f"layer.{i}" for i in range(8))
VIT_HEAD = ("head.weight", "head.bias")
RESNET_HEAD = ("fc.weight", "fc.bias")

CASES: tuple[ZooCase, ...] = (
    ZooCase(
        "resnet18-torchvision-replica",
        _seeded(lambda: replicas.resnet18(CLASSES, width=8)),
        _images(32),
        image_loss,
        ("stem", *RESNET_BLOCKS, "head"),
        RESNET_HEAD,
    ),
    ZooCase(
        "vit-timm-replica",
        _seeded(lambda: replicas.VisionTransformer(16, 4, CLASSES, 16, depth=2, num_heads=2)),
        _images(16),
        image_loss,
        ("stem", "layer.0", "layer.1", "norm", "head"),
        VIT_HEAD,
    ),
    ZooCase(
        "resnetv2-timm-replica",
        _seeded(lambda: replicas.ResNetV2((2, 1, 1, 1), CLASSES, width=4)),
        _images(32),
        image_loss,
        ("stem", *RESNET_BLOCKS[:4], "norm", "head"),
        ("head.fc.weight", "head.fc.bias"),
    ),
    ZooCase(
        "bert",
        _seeded(_bert),
        _padded_text,
        classifier_loss,
        ("stem", "layer.0", "layer.1", "bert.pooler.dense", "head"),
        ("classifier.weight", "classifier.bias"),
        requires=("transformers",),
    ),
    ZooCase(
        "gpt2-tied",
        _seeded(_gpt2),
        _tokens,
        causal_lm_loss,
        ("stem", "layer.0", "layer.1", "transformer.ln_f", "head"),
        ("transformer.wte.weight",),
        head="lm_head",
        requires=("transformers",),
    ),
    ZooCase(
        "llama",
        _seeded(_llama),
        _tokens,
        causal_lm_loss,
        ("stem", "layer.0", "layer.1", "model.norm", "head"),
        ("lm_head.weight",),
        requires=("transformers",),
    ),
    ZooCase(
        "resnet18-torchvision",
        _seeded(_tv_resnet18),
        _images(32),
        image_loss,
        ("stem", *RESNET_BLOCKS, "head"),
        RESNET_HEAD,
        requires=("torchvision",),
    ),
    ZooCase(
        "resnet18-timm",
        _seeded(_timm_resnet18),
        _images(32),
        image_loss,
        ("stem", *RESNET_BLOCKS, "head"),
        RESNET_HEAD,
        requires=("timm",),
    ),
    ZooCase(
        "vit-timm",
        _seeded(_timm_vit),
        _images(16),
        image_loss,
        ("stem", "layer.0", "layer.1", "norm", "head"),
        VIT_HEAD,
        requires=("timm",),
    ),
    ZooCase(
        "resnetv2-timm",
        _seeded(_timm_resnetv2),
        _images(32),
        image_loss,
        ("stem", *RESNET_BLOCKS[:4], "norm", "head"),
        ("head.fc.weight", "head.fc.bias"),
        requires=("timm",),
    ),
)

#: The real model each replica copies (their parameter names must agree).
REPLICA_OF = {
    "resnet18-torchvision": lambda: replicas.resnet18(CLASSES),
    "resnet18-timm": lambda: replicas.resnet18(CLASSES),
    "vit-timm": lambda: replicas.VisionTransformer(16, 4, CLASSES, 16, depth=2, num_heads=2),
}
