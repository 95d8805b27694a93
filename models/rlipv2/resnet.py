"""ResNet-50 with frozen batch norm, laid out as the reference checkpoint stores it (torchvision names).

The released R-Tagger checkpoint holds its backbone under `backbone.0.body.*` with torchvision's ResNet names
(`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...) and DETR's frozen batch norm (buffers
weight, bias, running_mean, running_var; no num_batches_tracked). torchvision cannot be installed beside
the CPU torch here, so reltag builds the same module tree itself; `hf_resnet_to_torchvision` maps the
weights of a transformers ResNet (`microsoft/resnet-50`) onto it for training from ImageNet weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ResNet-50 (He et al. 2016), torchvision's v1.5 layout: stride on the 3x3 conv of a bottleneck
RESNET50_DEPTHS = (3, 4, 6, 3)
RESNET50_WIDTHS = (64, 128, 256, 512)  # bottleneck inner widths; outputs are 4x these
EXPANSION = 4


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all buffers (DETR's `FrozenBatchNorm2d`).

    y = (x - mean) * weight / sqrt(var + eps) + bias, with eps = 1e-5 as in DETR and Deformable DETR.
    """

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a torchvision BatchNorm2d state dict also carries num_batches_tracked; frozen BN has no use for it
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 convolutions, frozen BN after each, identity or projected shortcut."""

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * EXPANSION
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), FrozenBatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetBody(nn.Module):
    """The stem and four stages; returns the outputs of layer2, layer3, layer4 (strides 8, 16, 32).

    Deformable DETR takes these three levels (its `return_interm_layers`); the stem and layer1 are frozen
    while training (lr 0 in the reference), which does not change the forward.
    """

    def __init__(self, depths=RESNET50_DEPTHS, widths=RESNET50_WIDTHS, stem: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(stem)
        c = stem
        for i, (n, w) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(Bottleneck(c, w, stride))
                c = w * EXPANSION
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.channels = [w * EXPANSION for w in widths[1:]]  # [512, 1024, 2048] for ResNet-50
        self.strides = [8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layer1(x)
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


def hf_resnet_to_torchvision(
    hf_state: dict[str, torch.Tensor], depths=RESNET50_DEPTHS
) -> dict[str, torch.Tensor]:
    """Rename a transformers ResNetModel/ResNetBackbone state dict (`microsoft/resnet-50`) to torchvision names.

    transformers: embedder.embedder.{convolution,normalization}, encoder.stages.S.layers.I.layer.K.{convolution,
    normalization}, encoder.stages.S.layers.I.shortcut.{convolution,normalization}; a `resnet.` prefix
    (ResNetForImageClassification) is stripped, the classifier and num_batches_tracked dropped.
    """

    def bn(src: str, dst: str, out: dict) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{dst}.{k}"] = hf_state[f"{src}.{k}"]

    hf_state = {k.removeprefix("resnet."): v for k, v in hf_state.items()}
    out: dict[str, torch.Tensor] = {}
    out["conv1.weight"] = hf_state["embedder.embedder.convolution.weight"]
    bn("embedder.embedder.normalization", "bn1", out)
    for s, n in enumerate(depths):
        for i in range(n):
            src, dst = f"encoder.stages.{s}.layers.{i}", f"layer{s + 1}.{i}"
            for k in range(3):
                out[f"{dst}.conv{k + 1}.weight"] = hf_state[f"{src}.layer.{k}.convolution.weight"]
                bn(f"{src}.layer.{k}.normalization", f"{dst}.bn{k + 1}", out)
            if f"{src}.shortcut.convolution.weight" in hf_state:
                out[f"{dst}.downsample.0.weight"] = hf_state[f"{src}.shortcut.convolution.weight"]
                bn(f"{src}.shortcut.normalization", f"{dst}.downsample.1", out)
    return out
