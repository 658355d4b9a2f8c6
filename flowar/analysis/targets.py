"""What the analysis tools run: FlowAR inference for a model config, resized to a largest side n.

The model config fixes the architecture; n (the side of the largest token map) is the size
parameter of the theory. :func:`scales_for_n` decides how the scale list follows n:

* ``"rescale"`` keeps the number of scales K and multiplies every side by n / (largest side),
  e.g. (1, 2, 4) -> (4, 8, 16) at n = 16. Depth stays constant: the TC0 setting.
* ``"double"`` keeps the smallest side and doubles up to n, e.g. (1, 2, 4) -> (1, 2, 4, 8, 16)
  at n = 16: FlowAR's own rule, under which K = log2(n / s_1) + 1 grows with n, so the
  circuit depth grows like log n (flagged by the circuit report as not TC0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowar.config import AttentionConfig, FlowARConfig, SamplingConfig
from flowar.errors import ConfigError, UserError

SCALE_RULES = ("rescale", "double")


def scales_for_n(scales: tuple[int, ...], n: int, rule: str = "rescale") -> tuple[int, ...]:
    """The scale list of a model whose largest side is ``n`` (see the module docstring)."""
    if rule not in SCALE_RULES:
        raise ConfigError(f"scale rule must be one of {SCALE_RULES}, got {rule!r}")
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if rule == "rescale":
        factor = n / scales[-1]
        sides = tuple(s * factor for s in scales)
        if any(abs(s - round(s)) > 1e-9 for s in sides) or round(sides[0]) < 1:
            raise ConfigError(
                f"n = {n} cannot rescale the scales {scales}: every side times "
                f"n/{scales[-1]} must be a whole number >= 1 (pick n a multiple of "
                f"{scales[-1] // math.gcd(*scales)}, or use the 'double' rule)"
            )
        return tuple(int(round(s)) for s in sides)
    first = scales[0]
    if n < first or n % first or (n // first) & (n // first - 1):
        raise ConfigError(
            f"n = {n} is not {first} times a power of two: the 'double' rule needs "
            f"n = {first} * 2^j"
        )
    sides, side = [], n
    while side >= first:
        sides.append(side)
        side //= 2
    return tuple(reversed(sides))


def config_for_n(
    config: FlowARConfig,
    n: int,
    rule: str = "rescale",
    attention: AttentionConfig | None = None,
) -> FlowARConfig:
    """``config`` with its scale list resized to largest side ``n`` (and another attention)."""
    changes: dict[str, Any] = {"scales": scales_for_n(config.scales, n, rule)}
    if attention is not None:
        changes["attention"] = attention
    return config.replace(**changes)


def widths(config: FlowARConfig) -> dict[str, int]:
    """Every width of the architecture (the theory's d, c and head widths)."""
    return {
        "width": config.width,
        "flow_width": config.flow.width,
        "channels": config.channels,
        "head_dim": config.head_dim,
        "flow_head_dim": config.flow.head_dim,
    }


@dataclass
class Case:
    """One computation to analyse at one n.

    Attributes:
        n: largest side.
        fn: the computation; ``fn(*inputs)`` returns its output.
        inputs: the circuit's inputs (class labels); noise is drawn inside ``fn``.
        scales: the scale list used.
        steps: ODE steps per scale.
        widths: widths of the architecture.
        meta: anything else worth reporting.
    """

    n: int
    fn: Callable[..., Any]
    inputs: tuple
    scales: tuple[int, ...]
    steps: int
    widths: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)


def build_model(config: FlowARConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A FlowAR with random weights (seeded, the global RNG is left as it was), in eval mode.

    The library zero-initialises the flow head's output layer (as the release does), which
    makes an untrained model return its input noise unchanged; every all-zero weight matrix is
    therefore redrawn (Xavier-uniform) so the random network computes something.
    """
    from flowar.model import FlowAR

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        try:
            model = FlowAR(config)
        except ValueError as err:
            raise UserError(f"cannot build the model: {err}") from None
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2 and not param.any():
                    torch.nn.init.xavier_uniform_(param)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.to(dtype).eval()


def sampling_case(
    model,
    n: int,
    *,
    steps: int,
    seed: int = 0,
    batch: int = 1,
    sampling: SamplingConfig | None = None,
) -> Case:
    """The inference pass of ``model``: class labels -> generated map of every scale."""
    from flowar.flow.sampler import count_steps, generate

    config = model.config
    sampling = sampling or SamplingConfig(steps=steps)
    labels = torch.arange(batch, dtype=torch.long) % config.num_classes

    def run(class_labels: torch.Tensor):
        return generate(model, class_labels, sampling, seed=seed)

    return Case(
        n=n, fn=run, inputs=(labels,), scales=config.scales, steps=count_steps(sampling),
        widths=widths(config), meta={"attention": config.attention.backend, "batch": batch},
    )


def flowar_case_factory(
    config: FlowARConfig,
    *,
    rule: str = "rescale",
    steps: int = 2,
    attention: AttentionConfig | None = None,
    seed: int = 0,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Callable[[int], Case]:
    """n -> :class:`Case` running inference of ``config`` resized to n (random weights)."""

    def make(n: int) -> Case:
        sized = config_for_n(config, n, rule, attention)
        model = build_model(sized, seed=seed, dtype=dtype)
        case = sampling_case(model, n, steps=steps, seed=seed, batch=batch)
        case.meta["rule"] = rule
        return case

    return make


def resolve_config(spec: str) -> tuple[FlowARConfig, Path | None]:
    """A model config from a preset name, a JSON config file or a checkpoint folder.

    Args:
        spec: "shipped" (the model shipped in flowar/assets), a name in
            :data:`flowar.config.PRESETS`, a checkpoint folder (config.json + weights), or a
            JSON file holding either a model config (as :func:`flowar.config.to_dict` writes
            it), ``{"model": {...}}`` or a checkpoint's config.json.

    Returns:
        (config, checkpoint folder or None).
    """
    from flowar.config import PRESETS, model_config_from_dict

    if spec in PRESETS:
        return PRESETS[spec], None
    path = Path(spec)
    if spec == "shipped":
        from flowar.pipeline import shipped_model_dir

        path = shipped_model_dir()
        if not (path / "config.json").exists():
            raise UserError(
                f"no shipped model found at {path}; pass a preset "
                f"({', '.join(PRESETS)}), a config file or a checkpoint folder"
            )
    if path.is_dir():
        data = _read_json(path / "config.json")
        return model_config_from_dict(data.get("model", data)), path
    if path.is_file():
        data = _read_json(path)
        return model_config_from_dict(data.get("model", data)), None
    raise UserError(
        f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}, shipped), nor a JSON "
        "config file, nor a checkpoint folder"
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object (a model config)")
    return data


def checkpoint_case(checkpoint: Path, *, steps: int, seed: int = 0, batch: int = 1) -> Case:
    """Inference of a checkpoint's own weights at its own size, in float64."""
    from flowar.pipeline import load_generator

    generator = load_generator(checkpoint)
    model = generator.model.to(torch.float64).eval()
    case = sampling_case(model, model.config.size, steps=steps, seed=seed, batch=batch)
    case.meta["checkpoint"] = str(checkpoint)
    return case
