"""Image <-> latent codecs: the identity :class:`PixelCodec` and the MAR KL-16 VAE."""

from flowar.codecs.base import Codec, PixelCodec

__all__ = ["Codec", "PixelCodec"]
