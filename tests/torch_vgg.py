"""The three published PyTorch VGG module definitions, rebuilt for tests (torchvision cannot be
imported here). Import only after ``pytest.importorskip("torch")``.

- torchvision ``models/vgg.py``: ``features`` from a cfg list (conv 3x3 padding 1 + ReLU, 'M' =
  MaxPool2d(2, 2)), ``AdaptiveAvgPool2d((7, 7))``, flatten, ``classifier`` Linear/ReLU/Dropout x3.
  ``hidden`` shrinks the 4096-wide classifier so tests stay small; the keys are the same.
- Gatys ``PytorchNeuralStyleTransfer`` ``VGG``: attributes ``conv1_1`` ... ``conv5_4``, F.relu,
  max pooling.
- pytorch-AdaIN ``net.vgg``: one Sequential, a 1x1 conv first, then ReflectionPad2d(1) + Conv2d(3x3,
  no padding) + ReLU, MaxPool2d(2, 2, ceil_mode=True).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CFGS: dict[str, list[int | str]] = {
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
    "vgg19": [
        *[64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"],
        *[512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
    ],
}

# AdaIN's 1x1 preprocessing conv: RGB in [0, 1] -> caffe BGR in [0, 255] minus the ImageNet mean.
ADAIN_PRE_WEIGHT = torch.tensor([[0.0, 0.0, 255.0], [0.0, 255.0, 0.0], [255.0, 0.0, 0.0]]).reshape(
    3, 3, 1, 1
)
ADAIN_PRE_BIAS = torch.tensor([-103.939, -116.779, -123.68])


class TorchvisionVGG(nn.Module):
    def __init__(self, arch: str, num_classes: int = 10, hidden: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in CFGS[arch]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )

    def relu_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                outs.append(x.clone())  # the next ReLU is in-place
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class GatysVGG(nn.Module):
    def __init__(self, arch: str = "vgg19") -> None:
        super().__init__()
        self.names: list[str] = []
        block, i, c_in = 1, 0, 3
        for v in CFGS[arch]:
            if v == "M":
                block, i = block + 1, 0
                continue
            assert isinstance(v, int)
            i += 1
            name = f"conv{block}_{i}"
            setattr(self, name, nn.Conv2d(c_in, v, kernel_size=3, padding=1))
            self.names.append(name)
            c_in = v
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

    def relu_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k, name in enumerate(self.names):
            x = F.relu(getattr(self, name)(x))
            outs.append(x)
            last_in_block = k + 1 == len(self.names) or self.names[k + 1].endswith("_1")
            if last_in_block:
                x = self.pool(x)
        return outs


def adain_vgg(arch: str = "vgg19") -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, 3, (1, 1))]
    c_in = 3
    for v in CFGS[arch]:
        if v == "M":
            layers.append(nn.MaxPool2d((2, 2), (2, 2), (0, 0), ceil_mode=True))
        else:
            assert isinstance(v, int)
            layers += [nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(c_in, v, (3, 3)), nn.ReLU()]
            c_in = v
    seq = nn.Sequential(*layers)
    with torch.no_grad():
        seq[0].weight.copy_(ADAIN_PRE_WEIGHT)
        seq[0].bias.copy_(ADAIN_PRE_BIAS)
    return seq


def adain_relu_outputs(seq: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for layer in seq:
        x = layer(x)
        if isinstance(layer, nn.ReLU):
            outs.append(x)
    return outs


def build(layout: str, arch: str, seed: int = 0) -> nn.Module:
    """A module of ``layout`` with random weights and non-zero random biases."""
    torch.manual_seed(seed)
    module: nn.Module
    if layout == "torchvision":
        module = TorchvisionVGG(arch)
    elif layout == "gatys":
        module = GatysVGG(arch)
    else:
        module = adain_vgg(arch)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") and not (layout == "adain" and name == "0.bias"):
                p.normal_(0.0, 0.05)
    return module.eval()


def relu_outputs(layout: str, module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        if layout == "adain":
            assert isinstance(module, nn.Sequential)
            return adain_relu_outputs(module, x)
        assert isinstance(module, (TorchvisionVGG, GatysVGG))
        return module.relu_outputs(x)
