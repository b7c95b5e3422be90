"""The image stem: a torchvision bottleneck ResNet (V1.5) truncated after its third stage.

OFA embeds an image as the stride-16, 1024-channel feature map of ResNet stages 1-3; parameter
names (conv1, bn1, layer1..layer3) match torchvision's, hence OFA's checkpoints.
"""
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet


class ResNetStem(ResNet):
    """ResNet stages 1-3 only: [B, 3, H, W] -> [B, 1024, H/16, W/16]."""

    out_channels = 1024

    def __init__(self, blocks=(3, 4, 23)):
        if len(blocks) != 3 or min(blocks) < 1:
            raise ValueError(f"resnet blocks must be three positive counts, got {blocks}")
        super().__init__(Bottleneck, list(blocks) + [1])
        del self.layer4, self.avgpool, self.fc  # never used: OFA stops after stage 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # fairseq-generate --fp16 halves the model but hands over float32 images (the trainer halves
        # its samples, the generate CLI does not): take the images in the weights' precision.
        images = images.to(self.conv1.weight.dtype)
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer3(self.layer2(self.layer1(x)))
