"""Text encoders trained from scratch, as ``features`` + ``head`` like the image networks.

Both take a text family's inputs, ``{"ids": (B, L) int64, "mask": (B, L) bool}`` (``mask``: a real token), and
return logits (B, ways); ``features`` gives the embedding ProtoNet compares. Both run under ``torch.func.vmap``
(``runner.backend=vmap``), which tests/test_text_tasks.py checks against the loop backend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metalab.errors import ConfigError

TextInputs = dict[str, Tensor]


def _check(**sizes: int) -> None:
    for key, value in sizes.items():
        if value < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {value}")


class ConvTextEncoder(nn.Module):
    """Kim (2014)'s sentence CNN: token embeddings, one 1-d convolution per window width, ReLU, max over the
    windows that start at a real token; the widths' maxima concatenated ((B, filters · len(widths)))."""

    def __init__(self, vocab_size: int, embedding_size: int, filters: int, widths: tuple[int, ...],
                 dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.convolutions = nn.ModuleList(nn.Conv1d(embedding_size, filters, width) for width in widths)
        self.dropout = nn.Dropout(dropout)
        self.size = filters * len(widths)

    def forward(self, x: TextInputs) -> Tensor:
        ids, mask = x["ids"], x["mask"]
        tokens = (self.embedding(ids) * mask.unsqueeze(-1)).transpose(1, 2)  # (B, E, L), padding zeroed
        pooled = []
        for convolution in self.convolutions:
            width = convolution.kernel_size[0]
            if tokens.shape[-1] < width:  # inputs shorter than the window: pad to one window
                tokens = F.pad(tokens, (0, width - tokens.shape[-1]))
                mask = F.pad(mask, (0, width - mask.shape[-1]))
            windows = F.relu(convolution(tokens))  # (B, F, L − w + 1), each ≥ 0
            # A window counts if it ends at a real token (it lies within the text; padding follows the text), and
            # the first always does (a text shorter than the window is padded to one): the features of a text do not
            # depend on how much padding follows it.
            inside = torch.cat([torch.ones_like(mask[:, :1]), mask[:, width:]], dim=1).unsqueeze(1)
            pooled.append(windows.masked_fill(~inside, 0.0).amax(-1))  # ReLU's outputs are ≥ 0: 0 drops a window
        return self.dropout(torch.cat(pooled, dim=-1))


class TextCNN(nn.Module):
    """:class:`ConvTextEncoder` and a linear head (Kim 2014; the CNN of Bao et al. 2020's baselines)."""

    def __init__(self, ways: int, vocab_size: int, embedding_size: int = 128, filters: int = 100,
                 widths: tuple[int, ...] = (3, 4, 5), dropout: float = 0.0) -> None:
        super().__init__()
        _check(ways=ways, vocab_size=vocab_size, embedding_size=embedding_size, filters=filters)
        if not widths or min(widths) < 1:
            raise ConfigError(f"model.widths must be window widths >= 1, got {list(widths)}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
        self.features = ConvTextEncoder(vocab_size, embedding_size, filters, tuple(widths), dropout)
        self.head = nn.Linear(self.features.size, ways)

    def forward(self, x: TextInputs) -> Tensor:
        return self.head(self.features(x))


class ComposedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` written with elementary ops. Under ``torch.func.vmap`` (``runner.backend=vmap``) the fused
    ``layer_norm``'s second derivative with respect to its input is wrong in torch 2.14 (its backward's batching rule,
    pytorch/functorch#534): second-order MAML's meta-gradient of the embeddings differed from the loop's, and the
    loop's matched finite differences (tests/test_text_tasks.py compares the two backends)."""

    def forward(self, x: Tensor) -> Tensor:
        centred = x - x.mean(-1, keepdim=True)
        scale = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + self.eps)
        return centred * scale * self.weight + self.bias


class TransformerBlock(nn.Module):
    """Pre-norm self-attention and MLP, each with a residual (Vaswani et al. 2017; pre-norm as Xiong et al. 2020).
    Attention ignores padding keys: ``mask`` (B, L)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm, self.mlp_norm = ComposedLayerNorm(width), ComposedLayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        batch, length, width = h.shape
        q, k, v = self.qkv(self.attention_norm(h)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        # Written out, not F.scaled_dot_product_attention: its CPU kernel has no second derivative, which second-order
        # MAML takes (torch 2.14: "derivative for ..._flash_attention_for_cpu_backward is not implemented").
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        attention = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        h = h + self.out((attention @ v).transpose(1, 2).reshape(batch, length, width))
        return h + self.mlp(self.mlp_norm(h))


class TransformerTextEncoder(nn.Module):
    """Token and learnt position embeddings, ``layers`` :class:`TransformerBlock`\\ s, a final LayerNorm, and the
    mean over real tokens ((B, width))."""

    def __init__(self, vocab_size: int, max_length: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.randn(max_length, width) / math.sqrt(width))
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(layers))
        self.norm = ComposedLayerNorm(width)
        self.size = width

    def forward(self, x: TextInputs) -> Tensor:
        ids, mask = x["ids"], x["mask"]
        if ids.shape[-1] > self.positions.shape[0]:
            raise ConfigError(f"texts of {ids.shape[-1]} tokens but model.max_length={self.positions.shape[0]}: "
                              "set model.max_length to task.max_length")
        mask = mask.clone()
        mask[:, 0] = True  # an empty text attends to its first (padding) position rather than to nothing (NaN)
        h = self.embedding(ids) + self.positions[: ids.shape[-1]]
        for block in self.blocks:
            h = block(h, mask)
        weights = mask.unsqueeze(-1).to(h.dtype)
        return (self.norm(h) * weights).sum(1) / weights.sum(1)


class TextTransformer(nn.Module):
    """A small Transformer encoder trained from scratch (:class:`TransformerTextEncoder`) and a linear head."""

    def __init__(self, ways: int, vocab_size: int, max_length: int, width: int = 128, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        _check(ways=ways, vocab_size=vocab_size, max_length=max_length, width=width, layers=layers, heads=heads)
        if width % heads:
            raise ConfigError(f"model.width={width} must be a multiple of model.heads={heads}")
        self.features = TransformerTextEncoder(vocab_size, max_length, width, layers, heads)
        self.head = nn.Linear(width, ways)

    def forward(self, x: TextInputs) -> Tensor:
        return self.head(self.features(x))
