"""Few-shot image networks from learn2learn, exposed as ``features`` + ``head`` (ANIL adapts the head)."""

from __future__ import annotations

import learn2learn as l2l
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalab.errors import ConfigError


class CNN4(nn.Module):
    """The standard 4-block conv net of few-shot learning (Vinyals et al. 2016; Finn et al. 2017):
    [conv3×3 → BatchNorm → ReLU → max-pool 2] × 4 then a linear head. 64 channels for Omniglot-like
    28×28 data, 32 for mini-ImageNet's 84×84 (Finn et al. 2017, §5.2). Built by ``l2l.vision.models.CNN4``.
    """

    def __init__(self, ways: int, channels: int = 1, image_size: int = 28, hidden_size: int = 64,
                 layers: int = 4) -> None:
        super().__init__()
        if not 1 <= layers <= 4:
            raise ConfigError(f"model.layers must be 1 to 4 (learn2learn's CNN4 max-pools each block by "
                              f"2·(4 // layers), which is 0 beyond 4), got {layers}")
        pool = 2 * (4 // layers)  # learn2learn's ConvBlock stride: the four blocks' downsampling, whatever layers
        side = image_size
        for _ in range(layers):  # each block max-pools by ``pool``, flooring
            side //= pool
        if ways < 1 or hidden_size < 1 or side < 1:
            raise ConfigError(f"model needs ways >= 1, hidden_size >= 1 and image_size >= {pool ** layers} for "
                              f"layers={layers}, got ways={ways}, hidden_size={hidden_size}, image_size={image_size}")
        network = l2l.vision.models.CNN4(ways, hidden_size=hidden_size, layers=layers, channels=channels,
                                         max_pool=True, embedding_size=side * side * hidden_size)
        for block in network.features:  # learn2learn's ConvBlock: conv → normalize → relu → max_pool
            block.relu, block.max_pool = nn.Identity(), PoolThenReLU(pool)
        self.features, self.head = network.features, network.classifier

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, H, W) → logits (B, ways)
        return self.head(self.features(x))


class PoolThenReLU(nn.Module):
    """``max_pool2d(relu(x), size)`` of a conv block, computed as ``relu(max_pool2d(x, size))``: the same values and
    gradients to any order (ReLU is monotone, and where a window's maximum is ≤ 0 both pass it no gradient),
    with the ReLU and its backward on a quarter of the values.

    On a CPU the window maxima are taken from ``x`` by the indices of a channels-last max-pool: PyTorch's
    max-pool kernel for (N, C, H, W) tensors is over 10× slower than its channels-last one. On a 75×64×28×28
    block output (one thread, torch 2.14, benchmarks/max_pool.py) this block's forward and differentiable
    backward took 26.6 ms against 59.5 ms for learn2learn's; metalab's default CNN4 run went from 1.08× to 1.15×
    the plain learn2learn loop (README, Performance). The ``gather`` differentiates as max-pool does (the
    gradient goes to each window's first maximum). Elsewhere (CUDA, inside ``torch.func`` transforms) torch's
    own max-pool is used.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or torch._C._functorch.is_functorch_wrapped_tensor(x):
            # torch.func's wrappers (vmap, grad) take no channels-last copy: torch's own max-pool there
            return F.relu(F.max_pool2d(x, self.size))
        with torch.no_grad():
            _, where = F.max_pool2d(x.detach().contiguous(memory_format=torch.channels_last), self.size,
                                    return_indices=True)
        where = where.contiguous()  # (N, C, H', W'): each window's maximum as an index into its H × W plane
        return F.relu(x.flatten(2).gather(2, where.flatten(2)).view(where.shape))

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ResNet12(nn.Module):
    """ResNet-12 of Oreshkin et al. 2018 / Lee et al. 2019 (MetaOptNet), by ``l2l.vision.models.ResNet12``."""

    def __init__(self, ways: int, channels: int = 3, wider: bool = True, dropblock_dropout: float = 0.1) -> None:
        super().__init__()
        if ways < 1:
            raise ConfigError(f"model needs ways >= 1, got ways={ways}")
        embedding = 640 if wider else 512  # the last block's channels: 64-160-320-640 (wider) or 64-128-256-512
        network = l2l.vision.models.ResNet12(ways, hidden_size=embedding, wider=wider, channels=channels,
                                             dropblock_dropout=dropblock_dropout)
        self.features, self.head = network.features, network.classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
