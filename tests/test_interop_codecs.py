"""Tests of the codec interface and the identity pixel codec."""

import pytest
import torch

from flowar.codecs import Codec, PixelCodec
from flowar.errors import UserError


def test_pixel_codec_round_trip_and_range():
    codec = PixelCodec(image_channels=3)
    images = torch.rand(2, 3, 8, 8)
    latents = codec.encode(images)
    assert latents.shape == images.shape
    assert latents.min() >= -1 and latents.max() <= 1
    assert torch.allclose(latents, images * 2 - 1)
    assert torch.allclose(codec.decode(latents), images, atol=1e-6)
    assert (codec.channels, codec.stride, codec.image_channels) == (3, 1, 3)
    assert isinstance(codec, Codec)


def test_pixel_codec_decode_clamps():
    codec = PixelCodec(1)
    out = codec.decode(torch.tensor([-3.0, 0.0, 5.0]).view(1, 1, 1, 3))
    assert out.flatten().tolist() == [0.0, 0.5, 1.0]


def test_pixel_codec_rejects_wrong_channels():
    codec = PixelCodec(1)
    with pytest.raises(UserError, match="shape"):
        codec.encode(torch.rand(2, 3, 8, 8))
    with pytest.raises(UserError, match="shape"):
        codec.decode(torch.rand(2, 8, 8))
    with pytest.raises(UserError):
        PixelCodec(0)
