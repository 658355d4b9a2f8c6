"""Image <-> latent codecs: the identity :class:`PixelCodec` and the MAR KL-16 VAE."""

from flowar.codecs.base import Codec, PixelCodec
from flowar.codecs.kl16 import KL16VAE, KL16Config, load_kl16

__all__ = ["Codec", "KL16Config", "KL16VAE", "PixelCodec", "load_kl16"]
