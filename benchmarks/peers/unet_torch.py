"""The project's `unet` (dlvae_jax.models.baselines.UNet) in PyTorch, as the
peer that `benchmarks/bench_train.py` times beside ours.

Same layers, widths and levels: per encoder level a DoubleConv (two
[3x3 conv without bias -> batch norm -> ReLU]) and a 2x2 max pool; a
bottleneck DoubleConv at features * 2^levels; per decoder level a nearest x2
upsample + 3x3 conv-norm-ReLU, the skip concatenated, a DoubleConv; a 1x1 conv
to one mask logit; and a class head (global average pool of the bottleneck ->
Linear(hidden) -> ReLU -> Linear(2)). The parameter count equals the Flax
model's (batch-norm running statistics are buffers in PyTorch and
`batch_stats` in Flax, so neither counts them).

The loss is the project's `total_loss` for this model with default weights:
softmax cross-entropy of the class logits + soft Dice (smooth 1) + pixel BCE
of the mask logits. Initialization follows PyTorch's defaults, not Flax's:
it changes no cost.

Requires the `peers` extra (`pip install -e '.[peers]'`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        # No conv bias: the batch norm's shift replaces it (as in the Flax layer).
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1),  # Flax momentum 0.9 = PyTorch 0.1
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(ConvNormAct(cin, cout), ConvNormAct(cout, cout))


class UNet(nn.Module):
    """(B, C, H, W) image -> (class logits (B, 2), mask logits (B, H, W)).

    H and W must be divisible by 2^levels.
    """

    def __init__(self, in_channels: int = 1, features: int = 32, levels: int = 4, classifier_hidden: int = 128):
        super().__init__()
        widths = [features * 2**level for level in range(levels)]
        self.encoder = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.encoder.append(DoubleConv(c, w))
            c = w
        self.bottleneck = DoubleConv(c, features * 2**levels)
        c = features * 2**levels
        self.class_head = nn.Sequential(nn.Linear(c, classifier_hidden), nn.ReLU(inplace=True),
                                        nn.Linear(classifier_hidden, 2))
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(ConvNormAct(c, w))
            self.decoder.append(DoubleConv(2 * w, w))
            c = w
        self.mask_head = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        logits = self.class_head(x.mean(dim=(2, 3)))
        for up, block, skip in zip(self.up, self.decoder, reversed(skips)):
            x = up(F.interpolate(x, scale_factor=2, mode="nearest"))
            x = block(torch.cat([x, skip], dim=1))
        return logits, self.mask_head(x)[:, 0]


def loss(logits_Bx2: torch.Tensor, mask_logits_BxHxW: torch.Tensor, mask_BxHxW: torch.Tensor,
         label_B: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Cross-entropy + soft Dice + pixel BCE, each a batch mean (dlvae_jax.losses)."""
    p = torch.sigmoid(mask_logits_BxHxW)
    inter = (p * mask_BxHxW).sum(dim=(1, 2))
    denom = p.sum(dim=(1, 2)) + mask_BxHxW.sum(dim=(1, 2))
    dice = (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()
    bce = F.binary_cross_entropy_with_logits(mask_logits_BxHxW, mask_BxHxW)
    return F.cross_entropy(logits_Bx2, label_B) + dice + bce


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adamw(model: nn.Module, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, weight_decay: float = 1e-4,
          eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW with optax.adamw's hyper-parameters. The fused kernel is used where
    this PyTorch build has it for the parameters' device (it is the fastest
    variant), else the multi-tensor one."""
    params = list(model.parameters())
    try:
        return torch.optim.AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, foreach=True)
