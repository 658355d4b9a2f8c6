"""The codec interface between images and the token maps the generator works on.

A codec turns images (B, C_img, H, W) with values in [0, 1] into latents
(B, channels, H / stride, W / stride) and back. The generator only ever sees latents; it needs
to know ``channels`` (token features) and ``stride`` (pixels per latent cell) to match sizes.

Two codecs exist: :class:`PixelCodec` (identity, the latent is the image mapped to [-1, 1]) and
the MAR KL-16 VAE in :mod:`flowar.codecs.kl16`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

    With ``patch_size`` p > 1 every p x p patch becomes one token of C * p * p channels
    (space-to-depth, :func:`torch.nn.functional.pixel_unshuffle`), which divides the token count
    by p * p without losing any information.

    Args:
        image_channels: channels of the images, e.g. 1 for MNIST.
        patch_size: pixels per latent cell along each side.
    """

    def __init__(self, image_channels: int = 1, patch_size: int = 1) -> None:
        super().__init__()
        if image_channels < 1:
            raise UserError(f"image_channels must be >= 1, got {image_channels}")
        if patch_size < 1:
            raise UserError(f"patch_size must be >= 1, got {patch_size}")
        self.image_channels = int(image_channels)
        self.patch_size = int(patch_size)
        self.channels = self.image_channels * self.patch_size**2
        self.stride = self.patch_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> latents 2 * images - 1, (B, C*p*p, H/p, W/p)."""
        self.check_images(images)
        return F.pixel_unshuffle(images * 2.0 - 1.0, self.patch_size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C*p*p, h, w) -> images (B, C, h*p, w*p), (x + 1) / 2 clamped to [0, 1]."""
        self.check_latents(latents)
        images = F.pixel_shuffle(latents, self.patch_size)
        return ((images + 1.0) * 0.5).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"image_channels={self.image_channels}, patch_size={self.patch_size}"
