"""From a checkpoint to images: the model, its codec and the batched sampling loop."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from flowar.codecs.base import Codec, PixelCodec
from flowar.config import AttentionConfig, SamplingConfig
from flowar.devices import parse_device
from flowar.errors import CheckpointError, ConfigError, UserError
from flowar.flow.sampler import generate
from flowar.io.checkpoint import load_checkpoint
from flowar.model import FlowAR

logger = logging.getLogger(__name__)

SHIPPED_MODEL = "flowar-mnist16"


def shipped_model_dir(name: str = SHIPPED_MODEL) -> Path:
    """Folder of a model shipped inside the package."""
    return Path(str(resources.files("flowar.assets").joinpath(name)))


def build_codec(spec: dict[str, Any]) -> Codec:
    """The codec described by a checkpoint's ``codec`` entry."""
    kind = spec.get("type", "pixel")
    if kind == "pixel":
        return PixelCodec(int(spec.get("image_channels", 1)), int(spec.get("patch_size", 1)))
    raise CheckpointError(f"unknown codec type {kind!r} in checkpoint (known: 'pixel')")


@dataclass
class Generator:
    """A loaded FlowAR model with its codec, ready to sample images.

    Attributes:
        model: the network (in eval mode).
        codec: maps generated latents to images.
        meta: checkpoint metadata: "dataset", "image_size", "num_classes", "class_names"...
    """

    model: FlowAR
    codec: Codec
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def default_sampling(self, **changes) -> SamplingConfig:
        """The checkpoint's recommended sampling settings (if any) with ``changes`` applied."""
        base = dict(self.meta.get("sampling", {}))
        base.update({k: v for k, v in changes.items() if v is not None})
        unknown = sorted(set(base) - {f.name for f in dataclasses.fields(SamplingConfig)})
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {unknown}; known: "
                              f"{[f.name for f in dataclasses.fields(SamplingConfig)]}")
        return SamplingConfig(**base)

    def check_labels(self, labels: torch.Tensor) -> None:
        """Raise a :class:`UserError` unless ``labels`` is a 1-D tensor of valid class ids."""
        if labels.dim() != 1:
            raise UserError(f"labels must be a 1-D list of class ids, got shape "
                            f"{tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise UserError(
                f"labels must be class ids in [0, {self.num_classes - 1}], got "
                f"{sorted(set(labels.tolist()))[:10]}"
            )

    def sample(
        self,
        labels: torch.Tensor | None,
        config: SamplingConfig,
        *,
        seed: int = 0,
        num_images: int | None = None,
        batch_size: int = 64,
        all_scales: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Generate images in [0, 1].

        Args:
            labels: (B,) class ids, or None for ``num_images`` unconditional images.
            config: sampling options.
            seed: image i of the request gets the same noise whatever ``batch_size``.
            batch_size: images generated at once.
            all_scales: also return the decoded image of every coarser scale.
            progress: called with the number of images finished after every batch.

        Returns:
            (B, C, H, W) images, or with ``all_scales`` a list of them, coarsest first.
        """
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            self.check_labels(labels)
            total = labels.shape[0]
        else:
            if num_images is None or num_images < 1:
                raise UserError("give labels or a positive number of images")
            total = num_images
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        device = next(self.model.parameters()).device
        per_scale: list[list[torch.Tensor]] = []
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            batch_labels = labels[start:stop].to(device) if labels is not None else None
            maps = generate(
                self.model, batch_labels, config, seed=seed, num_images=stop - start,
                image_ids=range(start, stop),
            )
            kept = maps if all_scales else maps[-1:]
            if not per_scale:
                per_scale = [[] for _ in kept]
            for k, latent in enumerate(kept):
                per_scale[k].append(self.codec.decode(latent.float()).cpu())
            if progress is not None:
                progress(stop - start)
        images = [torch.cat(chunks) for chunks in per_scale]
        return images if all_scales else images[0]


def load_generator(
    checkpoint: str | Path | None = None,
    *,
    attention: AttentionConfig | dict | None = None,
    device: str | torch.device = "cpu",
    use_ema: bool = True,
) -> Generator:
    """Load a generator from a checkpoint folder (default: the shipped model).

    Args:
        checkpoint: a folder written by ``flowar train`` (or the shipped asset).
        attention: replaces the attention config the model was trained with; a dict changes
            only the given fields of the model's own config (e.g. {"backend": "poly"}).
        device: where to run.
        use_ema: prefer the EMA weights when the checkpoint has them.
    """
    device = parse_device(device)
    path = Path(checkpoint) if checkpoint is not None else shipped_model_dir()
    ckpt = load_checkpoint(path)
    config = ckpt.model_config
    if isinstance(attention, dict):  # changes to the model's own attention config
        attention = dataclasses.replace(config.attention, **attention)
    if attention is not None:
        config = config.replace(attention=attention)
    model = FlowAR(config)
    weights = ckpt.best_weights() if use_ema else ckpt.weights
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (config: {tuple(expected[k].shape)})"
             for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(
            f"{path} does not match its config: {len(wrong)} tensors have other shapes, e.g. "
            f"{'; '.join(wrong[:2])}"
        )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Backends may own buffers (e.g. performer features) that a checkpoint trained with
    # another backend does not have; everything else must match exactly.
    missing = [k for k in missing if ".backend." not in k]
    unexpected = [k for k in unexpected if ".backend." not in k]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}"
        )
    model.to(device).eval()
    codec = build_codec(ckpt.meta.get("codec", {})).to(device)
    meta = dict(ckpt.meta.get("data", {}))
    meta.setdefault("num_classes", config.num_classes)
    if "sampling" in ckpt.meta:
        meta["sampling"] = dict(ckpt.meta["sampling"])
    logger.info("loaded %s (%s attention)", path, config.attention.backend)
    return Generator(model, codec, meta)
