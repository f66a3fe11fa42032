"""Few-shot image networks from learn2learn, exposed as ``features`` + ``head`` (ANIL adapts the head)."""

from __future__ import annotations

import learn2learn as l2l
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
        self.features, self.head = network.features, network.classifier

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, H, W) → logits (B, ways)
        return self.head(self.features(x))


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
