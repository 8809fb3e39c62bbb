"""ResNet-18 from torchvision, randomly initialised, with a choice of input stem."""
from __future__ import annotations

from torch import nn

STEMS = ("imagenet", "cifar")


def resnet18(num_classes: int, stem: str = "imagenet", in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18 (``weights=None``) for inputs ``[B, in_channels, H, W]`` float.

    Returns a module whose forward gives logits ``[B, num_classes]``; the head is ``fc``.

    ``stem="imagenet"`` keeps torchvision's 7x7 stride-2 conv + max-pool, which is what the
    paper's code uses even on 32x32 CIFAR images (a 4x downsampling before the first block).
    ``stem="cifar"`` uses the usual small-image stem: a 3x3 stride-1 conv and no max-pool.
    ``in_channels`` other than 3 (e.g. grayscale) replaces the first conv.
    """
    if stem not in STEMS:
        raise ValueError(f"resnet18 stem must be one of {', '.join(STEMS)}; got {stem!r}")
    import torchvision  # here, not at import: a process that never uses it should not pay its import

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if stem == "cifar" or in_channels != 3:
        # Same init torchvision gives its own convs, so both stems start from the same law.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
