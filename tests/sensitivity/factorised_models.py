"""Small float64 models for the factorised per-example norms: every covered layer type
(with the options that change its maths), tied weights, and layers that must fall back.

Each case is ``(model, loss_fn, batch, size, expected_fallback)``: ``expected_fallback``
names the parameters the fast path must hand to ``vmap`` (an empty tuple: none)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

DTYPE = torch.float64


class FCase(NamedTuple):
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    batch: Any
    size: int
    fallback: tuple[str, ...] = ()


def _sq_error(m: nn.Module, batch: Any) -> torch.Tensor:
    out = m(batch[0])
    return (out - batch[1]).square().reshape(out.shape[0], -1).sum(1).mean()


def _ce(m: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(m(batch[0]), batch[1])


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE)


def linear() -> FCase:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    return FCase(model, _ce, (_randn(7, 4), torch.randint(0, 3, (7,))), 7)


class Sequence(nn.Module):
    """Linear layers on (B, 2, 3, d) (six positions) and (B, 2, d): the Gram route
    (T² <= out·in) and the materialised one (T² > out·in)."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(4, 12)  # T = 6: 36 <= 48, Gram
        self.narrow = nn.Linear(12, 2)  # T = 6: 36 > 24, materialised
        self.tiny = nn.Linear(2, 2, bias=False)  # T = 2: 4 <= 4, Gram

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.narrow(torch.tanh(self.wide(x)))  # (B, 2, 3, 2)
        return self.tiny(h.mean(2).tanh())


def sequence() -> FCase:
    torch.manual_seed(11)
    return FCase(Sequence().to(DTYPE), _sq_error, (_randn(6, 2, 3, 4), _randn(6, 2, 2)), 6)


def conv1d() -> FCase:
    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv1d(4, 4, 2, dilation=2, groups=2, padding="same", padding_mode="reflect"),
        nn.ReLU(inplace=True),  # modifies the layer's output in place: δ is taken before
        nn.Conv1d(4, 2, 1, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 5, 2),
    ).to(DTYPE)
    return FCase(model, _ce, (_randn(5, 2, 9), torch.randint(0, 2, (5,))), 5)


def conv2d() -> FCase:
    torch.manual_seed(13)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 6, (2, 3), dilation=(2, 1), groups=2, padding=(1, 0), padding_mode="circular"),
        nn.Tanh(),
        nn.Conv2d(6, 6, 3, padding="same", groups=3, padding_mode="replicate"),
        nn.Tanh(),
        nn.Conv2d(6, 12, (4, 1), groups=2),  # one position: the Gram route
        nn.Flatten(),
        nn.Linear(12, 3),
    ).to(DTYPE)
    x = _randn(5, 2, 7, 6)
    return FCase(model, _ce, (x, torch.randint(0, 3, (5,))), 5)


class Tokens(nn.Module):
    """Embeddings of (B, T) ids with repeats and padding, and of (B,) ids."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(13, 3, padding_idx=0)  # T = 6: 36 <= 39, Gram
        self.kinds = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, kind = batch
        return self.head(torch.tanh(self.tokens(ids) + self.kinds(kind)[:, None]))


def embedding() -> FCase:
    torch.manual_seed(14)
    ids = torch.tensor([[1, 1, 0, 3, 1, 5], [0, 0, 2, 2, 6, 6], [4, 4, 4, 4, 4, 4],
                        [1, 2, 3, 4, 5, 6], [6, 0, 6, 0, 6, 1]])  # fmt: skip
    kind = torch.tensor([0, 3, 3, 1, 2])

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        return (m(batch[:2]) - batch[2]).square().sum((1, 2)).mean()

    return FCase(Tokens().to(DTYPE), loss_fn, (ids, kind, _randn(5, 6, 2)), 5)


class Norms(nn.Module):
    """LayerNorm (one and two normalised dims, with and without bias), RMSNorm,
    GroupNorm, and BatchNorm in eval mode with non-trivial running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.ln2 = nn.LayerNorm((3, 6), bias=False)
        self.rms = nn.RMSNorm(6)
        self.conv = nn.Conv2d(3, 4, 2)
        self.gn = nn.GroupNorm(2, 4)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn1 = nn.BatchNorm1d(4)
        self.head = nn.Linear(4 + 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.rms(torch.tanh(self.ln2(self.ln(self.inp(x)))))  # (B, 3, 6)
        img = h.reshape(h.shape[0], 3, 2, 3)
        c = self.bn2(self.gn(self.conv(img)).tanh())  # (B, 4, 1, 2)
        pooled = self.bn1(c.mean((2, 3)))
        return self.head(torch.cat([pooled, h.mean(1)], 1))


def norms() -> FCase:
    torch.manual_seed(15)
    model = Norms().to(DTYPE)
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    for m in (model.ln, model.ln2, model.rms, model.gn):
        nn.init.normal_(m.weight)
    model.eval()
    return FCase(model, _ce, (_randn(6, 3, 4), torch.randint(0, 2, (6,))), 6)


class TiedLinear(nn.Module):
    """One weight in two Linear layers, and one layer called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.head(h) + self.head(h.square())


def tied_linear() -> FCase:
    torch.manual_seed(16)
    return FCase(TiedLinear().to(DTYPE), _sq_error, (_randn(6, 2, 4), _randn(6, 2, 1)), 6)


class TiedLM(nn.Module):
    """An Embedding tied to the Linear head (rows = the vocabulary), as in GPT-2."""

    def __init__(self, vocab: int = 20, dim: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def _lm_loss(m: nn.Module, batch: Any) -> torch.Tensor:
    logits = m(batch[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


def tied_embedding(length: int = 3) -> FCase:  # two calls of T = 3: 36 <= 60, Gram
    torch.manual_seed(17)
    ids = torch.randint(0, 6, (5, length))  # few distinct ids: repeats
    return FCase(TiedLM().to(DTYPE), _lm_loss, (ids, torch.randint(0, 20, (5, length))), 5)


def tied_embedding_long() -> FCase:  # two calls of T = 8: 256 > 60, materialised
    return tied_embedding(8)


class Outside(nn.Module):
    """A weight also used outside its layer, a root parameter, attention, a sequence-first
    Linear and weight-normalised weights (parametrised, and the old pre-hook kind): those
    fall back, the rest (their biases included) stays fast."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.attn = nn.MultiheadAttention(3, 1, batch_first=True)
        self.first = nn.Linear(3, 3)
        self.head = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
        self.old = nn.utils.weight_norm(nn.Linear(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x)) + 0.1 * F.linear(x, self.lin.weight)
        h = self.attn(h, h, h, need_weights=False)[0] * self.scale
        h = self.first(h.transpose(0, 1)).transpose(0, 1)  # (T, B, d): not batch-first
        return self.old(self.head(h.mean(1)))


def outside() -> FCase:
    torch.manual_seed(18)
    model = Outside().to(DTYPE)
    attn = tuple(n for n, _ in model.attn.named_parameters())
    norms = ("head.parametrizations.weight.original0", "head.parametrizations.weight.original1",
             "old.weight_g", "old.weight_v")  # fmt: skip
    fallback = ("scale", "lin.weight", "first.weight", "first.bias", *norms,
                *(f"attn.{n}" for n in attn))  # fmt: skip
    return FCase(model, _ce, (_randn(6, 4, 3), torch.randint(0, 2, (6,))), 6, fallback)


CASES = [linear, sequence, conv1d, conv2d, embedding, norms, tied_linear, tied_embedding,
         tied_embedding_long, outside]  # fmt: skip
