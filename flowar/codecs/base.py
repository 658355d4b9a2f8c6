"""The codec interface between images and the token maps the generator works on.

A codec turns images (B, C_img, H, W) with values in [0, 1] into latents
(B, channels, H / stride, W / stride) and back. The generator only ever sees latents; it needs
to know ``channels`` (token features) and ``stride`` (pixels per latent cell) to match sizes.

Two codecs exist: :class:`PixelCodec` (identity, the latent is the image mapped to [-1, 1]) and
the MAR KL-16 VAE in :mod:`flowar.codecs.kl16`.
"""

from __future__ import annotations

import torch
from torch import nn

from flowar.errors import UserError


class Codec(nn.Module):
    """Abstract image <-> latent codec.

    Subclasses set ``channels`` (latent channels), ``stride`` (pixels per latent cell along each
    side) and ``image_channels`` (3 for RGB, 1 for grey) and implement :meth:`encode` and
    :meth:`decode`.
    """

    channels: int
    stride: int
    image_channels: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, image_channels, H, W) in [0, 1] -> latents (B, channels, H/s, W/s)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, channels, h, w) -> images (B, image_channels, h*s, w*s) in [0, 1]."""
        raise NotImplementedError

    def latent_side(self, image_side: int) -> int:
        """Side of the latent map for a square image of ``image_side`` pixels."""
        if image_side % self.stride != 0:
            raise UserError(
                f"image side {image_side} is not a multiple of the codec stride {self.stride}; "
                "resize or crop the images first"
            )
        return image_side // self.stride

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a :class:`UserError` unless ``images`` is (B, image_channels, H, W) and H, W
        are multiples of ``stride``."""
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise UserError(
                f"{type(self).__name__} expects images of shape (B, {self.image_channels}, H, W), "
                f"got {tuple(images.shape)}"
            )
        for side in images.shape[-2:]:
            self.latent_side(int(side))

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raise a :class:`UserError` unless ``latents`` is (B, channels, h, w)."""
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise UserError(
                f"{type(self).__name__} expects latents of shape (B, {self.channels}, h, w), "
                f"got {tuple(latents.shape)}"
            )


class PixelCodec(Codec):
    """Identity codec: the latent is the image rescaled from [0, 1] to [-1, 1].

    Args:
        image_channels: channels of the images (and so of the latents), e.g. 1 for MNIST.
    """

    def __init__(self, image_channels: int = 1) -> None:
        super().__init__()
        if image_channels < 1:
            raise UserError(f"image_channels must be >= 1, got {image_channels}")
        self.image_channels = int(image_channels)
        self.channels = int(image_channels)
        self.stride = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents ``2 * images - 1`` in [-1, 1] (same shape)."""
        self.check_images(images)
        return images * 2.0 - 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> ``(latents + 1) / 2`` clamped to [0, 1] (same shape)."""
        self.check_latents(latents)
        return ((latents + 1.0) * 0.5).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"image_channels={self.image_channels}"
