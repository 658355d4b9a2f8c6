"""Scale-by-scale generation: one incremental AR pass per scale, then an Euler ODE solve.

Classifier-free guidance doubles the AR batch (conditional rows first, null-class rows last)
only when some scale has guidance > 1; the flow head runs on the doubled batch only on steps
where guidance is on, and both halves then share the conditional state. Noise is drawn per
image from its own generator, so image i is the same whatever the batch it is generated in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from flowar.config import SamplingConfig
from flowar.flow.path import euler_step
from flowar.flow.schedule import guidance_on, scale_guidance, time_grid
from flowar.pyramid import from_tokens

StepCallback = Callable[[int, int], None]


def image_seed(seed: int, image_id: int) -> int:
    """A well-mixed 63-bit seed for image ``image_id`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, image_id]).generate_state(2, np.uint64)[0] >> 1)


def per_image_noise(
    seed: int,
    image_ids: Sequence[int],
    scales: Sequence[int],
    channels: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Starting noise of every scale, (B, s*s, C) each, drawn per image in scale order."""
    per_scale: list[list[torch.Tensor]] = [[] for _ in scales]
    for image_id in image_ids:
        gen = torch.Generator().manual_seed(image_seed(seed, int(image_id)))
        for k, side in enumerate(scales):
            per_scale[k].append(torch.randn(side * side, channels, generator=gen))
    return [torch.stack(rows).to(device=device, dtype=dtype) for rows in per_scale]


@torch.no_grad()
def generate(
    model,
    labels: torch.Tensor | None,
    config: SamplingConfig,
    *,
    seed: int = 0,
    num_images: int | None = None,
    image_ids: Sequence[int] | None = None,
    on_step: StepCallback | None = None,
) -> list[torch.Tensor]:
    """Generate latent maps scale by scale.

    Args:
        model: a :class:`flowar.model.FlowAR`.
        labels: (B,) class ids in [0, num_classes); None for unconditional sampling.
        config: sampling options (steps, time grid, guidance).
        seed: base seed; image ``image_ids[i]`` always gets the same noise.
        num_images: batch size when ``labels`` is None.
        image_ids: ids of the images in this batch (default 0 .. B-1).
        on_step: called as on_step(scale_index, step_index) after every Euler step.

    Returns:
        The generated (B, C, s, s) map of every scale, coarsest first.
    """
    mcfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if labels is None:
        if num_images is None or num_images < 1:
            raise ValueError("unconditional sampling needs num_images >= 1")
        labels = torch.full((num_images,), mcfg.null_class, dtype=torch.long, device=device)
        conditional = False
    else:
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError("labels must be a non-empty 1-D tensor of class ids")
        if labels.min() < 0 or labels.max() >= mcfg.num_classes:
            raise ValueError(
                f"labels must be in [0, {mcfg.num_classes - 1}], got "
                f"[{int(labels.min())}, {int(labels.max())}] (omit labels for unconditional)"
            )
        conditional = True
    batch = labels.shape[0]
    ids = list(range(batch)) if image_ids is None else list(image_ids)
    if len(ids) != batch:
        raise ValueError(f"{len(ids)} image ids for a batch of {batch}")

    strengths = scale_guidance(config.cfg, len(mcfg.scales), config.cfg_schedule)
    guided = conditional and any(s > 1.0 for s in strengths)
    grid = time_grid(config.steps, config.time_grid).tolist()
    noise = per_image_noise(seed, ids, mcfg.scales, mcfg.channels, device=device, dtype=dtype)

    class_vec = model.class_embedding(labels)
    if guided:
        null = torch.full_like(labels, mcfg.null_class)
        class_vec = torch.cat([class_vec, model.class_embedding(null)])  # (2B, D)

    was_training = model.training
    model.eval()
    cache = model.new_cache()
    outputs: list[torch.Tensor] = []
    try:
        previous = None
        for k, side in enumerate(mcfg.scales):
            ar_previous = previous
            if guided and previous is not None:
                ar_previous = torch.cat([previous, previous])  # null half sees the same map
            z = model.condition_step(cache, class_vec, ar_previous)
            z_cond = z[:batch]
            x = noise[k]
            for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
                if guided and guidance_on(strengths[k], t_cur, config):
                    t = torch.full((2 * batch,), t_cur, device=device, dtype=dtype)
                    v_cond, v_null = model.velocity(torch.cat([x, x]), t, z).chunk(2)
                    v = v_null + strengths[k] * (v_cond - v_null)
                else:
                    t = torch.full((batch,), t_cur, device=device, dtype=dtype)
                    v = model.velocity(x, t, z_cond)
                x = euler_step(x, v, t_cur, t_next)
                if on_step is not None:
                    on_step(k, i)
            previous = from_tokens(x, side)
            outputs.append(previous)
    finally:
        cache.release()
        model.train(was_training)
    return outputs


def count_steps(config: SamplingConfig) -> int:
    """Euler steps per scale for a sampling config."""
    return len(time_grid(config.steps, config.time_grid)) - 1
