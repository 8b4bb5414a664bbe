"""Attention just works: every pass differentiated twice runs on the math SDPA backend.

Exactness on a tiny float64 model with ``F.scaled_dot_product_attention`` (whose fused CPU
kernel has no second derivative): Hutchinson traces equal the dense Hessian's with the same
probes, and the exact GGN trace equals the dense Gauss-Newton block traces. Then the layers
users have: a timm-like ViT block, ``nn.MultiheadAttention`` (train and eval: its fused fast
path), tiny random-initialised Hugging Face BERT and GPT-2 with SDPA attention. The caller's
backend settings are what they were afterwards.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from layerwise.sensitivity import (
    CrossEntropy,
    default_groups,
    estimate,
    make_generator,
    model_output_loss,
)

from .cases import sdpa_attention, tied_lm
from .reference import dense_hessian, ggn_block_traces, hutchinson_reference


def _sdp_flags() -> tuple[bool, ...]:
    b = torch.backends.cuda
    return (
        b.flash_sdp_enabled(),
        b.mem_efficient_sdp_enabled(),
        b.math_sdp_enabled(),
        b.cudnn_sdp_enabled(),
        torch.backends.mha.get_fastpath_enabled(),
    )


@pytest.mark.parametrize(
    "make, hvp_mode",
    [(sdpa_attention, "vjp"), (tied_lm, "vjp"), (tied_lm, "jvp")],
    ids=["sdpa_attention-vjp", "tied_lm-vjp", "tied_lm-jvp"],
)  # (F.mse_loss, sdpa_attention's loss, has a PyTorch bug under jvp: pytorch#123996)
def test_hutchinson_traces_of_an_sdpa_model_equal_the_dense_reference(make, hvp_mode):
    case = make()
    groups = default_groups(case.model)
    report = estimate(
        case.model, case.loss_fn, case.batch, quantities=["hessian_trace"], probes=6,
        chunk_size=4, seed=3, hvp_mode=hvp_mode,
    )  # fmt: skip
    assert report.settings["attention_backend"] == "math"
    assert report.settings["hvp_mode"] == hvp_mode  # no fallback from forward mode needed
    order = [n for n, _ in case.model.named_parameters()]
    like = {n: p.detach() for n, p in case.model.named_parameters()}
    with sdpa_kernel(SDPBackend.MATH):  # the reference needs double backward too
        h, slices = dense_hessian(case, order)
    expected = hutchinson_reference(
        h, order, slices, groups, like, probes=6, chunk=4, generator=make_generator("cpu", 3),
        isolated=False,
    )  # fmt: skip
    for g, (mean, stderr) in expected.items():
        assert report[g].hessian_trace == pytest.approx(mean, rel=1e-9, abs=1e-11)
        assert report[g].hessian_trace_stderr == pytest.approx(stderr, rel=1e-9, abs=1e-11)


@pytest.mark.parametrize("make", [sdpa_attention, tied_lm])
def test_exact_ggn_traces_of_sdpa_models_equal_the_dense_reference(make):
    case = make()
    groups = default_groups(case.model)
    report = estimate(case.model, case.loss_object, case.batch, quantities=["ggn_trace"],
                      ggn="exact")  # fmt: skip
    assert report.settings["attention_backend"] == "math"
    for g, exact in ggn_block_traces(case, groups).items():
        assert report[g].ggn_trace == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_the_callers_backend_settings_are_restored():
    case = sdpa_attention()
    before = _sdp_flags()
    estimate(case.model, case.loss_fn, case.batch, probes=2)
    assert _sdp_flags() == before
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            chosen = _sdp_flags()
            estimate(case.model, case.loss_fn, case.batch, probes=2)
            assert _sdp_flags() == chosen
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert _sdp_flags() == before


class ViTBlock(nn.Module):
    """A timm-style pre-norm ViT block and head: qkv Linear, F.scaled_dot_product_attention,
    an MLP, mean pooling."""

    def __init__(self, width: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


class MHAModel(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def _logits(model, batch):
    return model(batch[0])


@pytest.mark.parametrize("make", [ViTBlock, MHAModel])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_attention_layers_give_every_quantity(make, train):
    torch.manual_seed(0)
    model = make().train(train)
    batch = (torch.randn(6, 5, 8), torch.randint(0, 3, (6,)))
    ce = CrossEntropy(_logits, lambda b: b[1])
    report = estimate(
        model,
        ce,
        batch,
        probes=2,
        quantities=["grad_norm", "grad_variance", "hessian_trace", "ggn_trace"],
    )
    assert report.settings["attention_backend"] == "math"
    for row in report:
        for value in (row.grad_norm, row.grad_variance, row.hessian_trace, row.ggn_trace):
            assert math.isfinite(value)
    assert model.training is train


def test_multihead_attention_matches_the_math_backend_run_by_hand():
    """The estimate equals the one a user got before by selecting the math backend in
    ``loss_fn`` (the old advice), to the last bit: the same kernels run."""
    torch.manual_seed(1)
    model = MHAModel().double().eval()
    batch = (torch.randn(4, 3, 8, dtype=torch.float64), torch.randint(0, 3, (4,)))

    def ce(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    def by_hand(m, b):
        with sdpa_kernel(SDPBackend.MATH):
            return ce(m, b)

    ours = estimate(model, ce, batch, probes=3, seed=2)
    theirs = estimate(model, by_hand, batch, probes=3, seed=2)
    for g in ours.names:
        assert ours[g].hessian_trace == theirs[g].hessian_trace
        assert ours[g].grad_variance == pytest.approx(theirs[g].grad_variance, rel=1e-12)


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, num_labels=3,
        attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=0,
        eos_token_id=0, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def hf_batch(kind: str, size: int = 4, length: int = 6) -> dict[str, torch.Tensor]:
    """Token ids with right padding (examples 1 and 3 padded) and labels: one class per
    sequence for BERT, the tokens themselves (padding ignored, -100) for GPT-2."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[1, length - 2 :] = 0
    mask[3, 2:] = 0
    if kind == "bert":
        labels = torch.randint(0, 3, (size,), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hugging_face_sdpa_models_give_hessian_traces(kind):
    torch.manual_seed(0)
    model = (_bert if kind == "bert" else _gpt2)().eval()
    batch = hf_batch(kind)
    report = estimate(model, model_output_loss, batch, probes=2,
                      quantities=["grad_norm", "hessian_trace"])  # fmt: skip
    assert report.settings["attention_backend"] == "math"
    assert all(math.isfinite(row.hessian_trace) for row in report)


def test_no_pass_of_an_estimate_takes_the_multihead_fast_path(monkeypatch):
    """In eval mode a pass without gradients (the GGN's shape check of the first example's
    outputs) would take ``torch._native_multi_head_attention``; under ``torch.func``'s
    ``grad`` it is not taken. Inside the estimator it is never taken."""
    calls = []
    native = torch._native_multi_head_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", counting)
    torch.manual_seed(0)
    model = MHAModel().eval()
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        model(x)
    assert calls, "the fast path is taken by a plain pass without gradients"
    calls.clear()
    ce = CrossEntropy(_logits, lambda b: b[1])
    estimate(model, ce, (x, torch.randint(0, 3, (4,))), probes=2,
             quantities=["grad_variance", "hessian_trace", "ggn_trace"])  # fmt: skip
    assert not calls
