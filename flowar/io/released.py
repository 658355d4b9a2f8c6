"""The released FlowAR weights: load, infer their config, save in their layout.

The official FlowAR-S/L/H files are bare state dicts whose keys are exactly this package's
module names plus one extra buffer, ``mask`` (the 0 / -inf block-causal attention mask). This
module also reads training checkpoints of the official code (``model`` / ``model_ema`` entries,
EMA preferred), keys written through a DDP (``module.``) or ``torch.compile`` (``_orig_mod.``)
wrapper, and .pth / .ckpt / .safetensors files. Pickled files are only opened with
``torch.load(weights_only=True)`` (see :mod:`flowar.io.weights`).

Loading never guesses silently: the config is read from the tensor shapes (spec section 5.5),
the ``mask`` and every ``rope.freqs`` buffer are checked against recomputed values, and a
mismatch names the first missing, unexpected and wrongly shaped keys together with the config
that was inferred.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowar.attention.base import BlockLayout
from flowar.attention.registry import build_backend
from flowar.config import (
    PRESETS,
    AttentionConfig,
    FlowARConfig,
    FlowHeadConfig,
    SamplingConfig,
    model_config_from_dict,
    to_dict,
)
from flowar.errors import CheckpointError, ConfigError
from flowar.io.weights import read_safetensors_metadata, read_weights, write_safetensors_atomic
from flowar.nn.rope import Rope2d

logger = logging.getLogger(__name__)

MASK_KEY = "mask"
CONFIG_METADATA_KEY = "flowar_config"
RELEASED_PRESETS = ("flowar-s", "flowar-l", "flowar-h")
# Wrapper prefixes: DistributedDataParallel / DataParallel and torch.compile's OptimizedModule.
_DDP_PREFIX = "module."
_COMPILE_PART = "_orig_mod"

# The README's evaluation settings of the released models (spec section 4.3).
RELEASED_RECIPES: dict[str, SamplingConfig] = {
    "flowar-s": SamplingConfig(steps=25, time_grid="released", cfg=4.3, guidance_high=0.9),
    "flowar-l": SamplingConfig(steps=25, time_grid="released", cfg=2.4, guidance_high=0.9),
    "flowar-h": SamplingConfig(steps=50, time_grid="released", cfg=2.4, guidance_high=0.7),
}


# ------------------------------------------------------------------------------------------------
# Sampling recipe


def released_sampling_config(model: str | FlowARConfig, **overrides: Any) -> SamplingConfig:
    """The released evaluation recipe for a model: two-piece time grid, linear per-scale
    guidance ramp from 1 to ``cfg``, guidance interval [0, guidance_high].

    Args:
        model: a preset name ("flowar-s", "flowar-l", "flowar-h") or a config that matches one.
        overrides: fields of :class:`SamplingConfig` to change (e.g. ``cfg=2.8``).
    """
    name = model if isinstance(model, str) else match_preset(model)
    if name not in RELEASED_RECIPES:
        raise ConfigError(
            f"no released sampling recipe for {model if isinstance(model, str) else 'this model'}"
            f"; the recipe exists for {', '.join(RELEASED_RECIPES)} only. Give the sampling "
            "options (steps, cfg, guidance) explicitly instead"
        )
    recipe = RELEASED_RECIPES[name]
    return dataclasses.replace(recipe, **overrides) if overrides else recipe


# ------------------------------------------------------------------------------------------------
# Wrappers: DDP / compile


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, _COMPILE_PART, None), nn.Module):
            model = getattr(model, _COMPILE_PART)
        else:
            return model


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop leading ``module.`` and every ``_orig_mod`` key component (in any order)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        while parts and parts[0] in ("module", _COMPILE_PART):
            parts = parts[1:]
        clean = ".".join(p for p in parts if p != _COMPILE_PART)
        if clean in out:
            raise CheckpointError(f"two entries map to the key {clean!r} once wrapper prefixes "
                                  "are removed; the state dict is inconsistent")
        out[clean] = value
    return out


def select_state_dict(
    obj: Any, source: str = "checkpoint", prefer_ema: bool = True
) -> tuple[dict[str, torch.Tensor], str]:
    """The model weights inside a loaded object, with wrapper prefixes removed.

    Looks for ``model_ema`` (when ``prefer_ema``), then ``model``, then ``state_dict``; otherwise
    treats ``obj`` as a bare state dict.

    Returns:
        (state dict, name of the entry used: "model_ema", "model", "state_dict" or "bare").
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict or a "
                              "checkpoint dict")
    order = ("model_ema", "model", "state_dict") if prefer_ema else ("model", "state_dict")
    entry = "bare"
    for name in order:
        if isinstance(obj.get(name), Mapping):
            obj, entry = obj[name], name
            break
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{source}: expected a state dict of tensors but {len(not_tensors)} entries are not "
            f"tensors (first: {not_tensors[:3]}); a training checkpoint should hold its weights "
            "under 'model' or 'model_ema'"
        )
    return strip_wrapper_prefixes(obj), entry


# ------------------------------------------------------------------------------------------------
# Buffers: mask and RoPE frequencies


def block_causal_mask(scales: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The released ``mask`` buffer, (1, 1, T, T): 0 where a token may attend, -inf elsewhere."""
    allowed = BlockLayout(tuple(s * s for s in scales)).allowed()  # (T, T) bool
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, float("-inf"))
    return mask[None, None]


def scales_from_mask(mask: torch.Tensor) -> tuple[int, ...]:
    """Recover the scale sides from a released block-causal ``mask`` (1, 1, T, T).

    Row i of the mask allows exactly the keys of every scale up to i's own, so the distinct
    counts of allowed keys are the cumulative token counts.
    """
    if mask.ndim != 4 or mask.shape[:2] != (1, 1) or mask.shape[2] != mask.shape[3]:
        raise CheckpointError(f"'mask' has shape {tuple(mask.shape)}, expected (1, 1, T, T)")
    counts = torch.isfinite(mask[0, 0].float()).sum(dim=1).tolist()
    ends = sorted(set(int(c) for c in counts))
    lengths = [b - a for a, b in zip([0] + ends[:-1], ends)]
    sides = tuple(math.isqrt(n) for n in lengths)
    if not ends or ends[-1] != mask.shape[-1] or any(s * s != n for s, n in zip(sides, lengths)):
        raise CheckpointError(
            "'mask' is not a block-causal mask over square scales "
            f"(allowed-key counts {ends[:8]}); the file is corrupt or not a FlowAR model"
        )
    check_mask(mask, sides)
    return sides


def check_mask(mask: torch.Tensor, scales: tuple[int, ...]) -> None:
    """Raise a :class:`CheckpointError` unless ``mask`` is the block-causal mask of ``scales``."""
    if mask.is_meta:
        return
    expected = block_causal_mask(scales)
    if mask.shape != expected.shape or not torch.equal(mask.float().cpu(), expected):
        raise CheckpointError(
            f"'mask' (shape {tuple(mask.shape)}) differs from the block-causal mask of scales "
            f"{scales}; the file was made with other scales or a buffer_size > 0, which flowar "
            "does not support"
        )


def check_rope_freqs(state: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise unless every ``*.rope.freqs`` in ``state`` equals the model's recomputed buffer."""
    expected = dict(model.named_buffers())
    for key, value in state.items():
        if not key.endswith("rope.freqs") or key not in expected or value.is_meta:
            continue
        mine = expected[key]
        if mine.is_meta:
            mine = Rope2d(4 * mine.numel(), _rope_base(model)).freqs
        if value.shape != mine.shape or not torch.allclose(
            value.float().cpu(), mine.float().cpu(), rtol=1e-5, atol=0
        ):
            raise CheckpointError(
                f"{key} differs from the RoPE frequencies of the inferred config (head width "
                f"{4 * mine.numel()}, base {_rope_base(model)}); pass the right head count "
                "(--heads) or config"
            )


def _rope_base(model: nn.Module) -> float:
    config = getattr(model, "config", None)
    return float(config.rope_base) if config is not None else 10000.0


# ------------------------------------------------------------------------------------------------
# Config inference


def _block_indices(state: Mapping[str, Any], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if found and found != set(range(len(found))):
        raise CheckpointError(f"{prefix} indices {sorted(found)} are not 0..n-1")
    return sorted(found)


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(
            f"the state dict has no {key!r}; it is not a FlowAR model in the released layout "
            f"(first keys: {list(state)[:5]})"
        )
    return tuple(state[key].shape)


def _mlp_ratio(width: int, hidden: int) -> float:
    """The mlp_ratio r with int(width * r * 2 / 3) == hidden (4.0 when that fits)."""
    for ratio in (4.0, hidden * 1.5 / width, (hidden + 0.5) * 1.5 / width):
        if int(width * ratio * 2 / 3) == hidden:
            return ratio
    raise CheckpointError(f"cannot find an MLP ratio giving hidden size {hidden} at width {width}")


def _shape_fields(config: FlowARConfig) -> tuple:
    """The parts of a config that the tensor shapes and RoPE buffers determine."""
    f = config.flow
    return (config.scales, config.channels, config.num_classes, config.width,
            config.encoder_depth, config.decoder_depth, config.num_heads, config.mlp_ratio,
            f.width, f.depth, f.num_heads, f.cross_attention, f.mlp_ratio, f.time_embed_dim)


def match_preset(config: FlowARConfig) -> str | None:
    """Name of the preset with the same sizes as ``config`` (None if there is none)."""
    for name, preset in PRESETS.items():
        if _shape_fields(preset) == _shape_fields(config):
            return name
    return None


def infer_config(
    state: Mapping[str, torch.Tensor],
    *,
    heads: int | None = None,
    base: FlowARConfig | None = None,
) -> FlowARConfig:
    """Infer a :class:`FlowARConfig` from a released-layout state dict (spec section 5.5).

    Widths, depths, channels, classes, MLP ratios and the flow block type come from tensor
    shapes; scales from the ``mask`` buffer (or the token count: ``base.scales`` if it fits,
    else doubling sides 1, 2, 4, ...); the AR head width is 4 x len(``attn.rope.freqs``), and
    without that buffer ``heads`` or a preset with the same sizes decides. Fields that shapes
    cannot show (RoPE grid and base, time scale, dropouts, attention backend) come from ``base``
    (default: :class:`FlowARConfig` defaults).
    """
    explicit_base = base is not None
    base = base or FlowARConfig()
    rows, dim = _shape(state, "class_emb.weight")
    channels = _shape(state, "z_proj.weight")[1]
    tokens = _shape(state, "encoder_pos_embed_learned")[1]
    diffusion_tokens = _shape(state, "diffusion_pos_embed_learned")[1]
    if diffusion_tokens != tokens:
        raise CheckpointError(
            f"encoder position table has {tokens} rows but the diffusion table {diffusion_tokens}:"
            " the model was trained with buffer_size > 0, which flowar does not support"
        )
    if MASK_KEY in state and not state[MASK_KEY].is_meta:
        scales = scales_from_mask(state[MASK_KEY])
    elif sum(s * s for s in base.scales) == tokens:
        scales = base.scales
    else:
        scales = _doubling_scales(tokens)
    enc = _block_indices(state, "encoder_blocks")
    dec = _block_indices(state, "decoder_blocks")
    first = f"encoder_blocks.{enc[0]}" if enc else (f"decoder_blocks.{dec[0]}" if dec else None)
    mlp_ratio = base.mlp_ratio
    num_heads = None
    if first is not None:
        mlp_ratio = _mlp_ratio(dim, _shape(state, f"{first}.mlp.fc1_g.weight")[0])
        freqs_key = f"{first}.attn.rope.freqs"
        if freqs_key in state:
            head_dim = 4 * state[freqs_key].numel()
            if dim % head_dim:
                raise CheckpointError(f"{freqs_key} implies head width {head_dim}, which does "
                                      f"not divide the width {dim}")
            num_heads = dim // head_dim
            if heads is not None and heads != num_heads:
                raise CheckpointError(f"--heads {heads} contradicts {freqs_key}, which implies "
                                      f"{num_heads} heads of width {head_dim}")
    num_heads = num_heads or heads

    flow_width = _shape(state, "flownet.input_proj.weight")[0]
    flow_blocks = _block_indices(state, "flownet.res_blocks")
    cross = any(".crossattn." in k for k in state if k.startswith("flownet."))
    time_dim = _shape(state, "flownet.time_embed.mlp.0.weight")[1]
    flow_ratio, flow_heads = base.flow.mlp_ratio, None
    if flow_blocks:
        fb = "flownet.res_blocks.0"
        flow_ratio = _mlp_ratio(flow_width, _shape(state, f"{fb}.mlp.fc1_g.weight")[0])
        if f"{fb}.attn.rope.freqs" in state:
            flow_heads = flow_width // (4 * state[f"{fb}.attn.rope.freqs"].numel())
    if flow_heads is None:  # the release uses heads of width 64 in the flow head
        for candidate in (flow_width // 64, base.flow.num_heads):
            head_width = flow_width // candidate if candidate >= 1 else 0
            if candidate >= 1 and flow_width % candidate == 0 and head_width % 4 == 0:
                flow_heads = candidate
                break
        else:
            raise CheckpointError(
                f"cannot tell the flow head's head count: no flownet rope.freqs buffers and its "
                f"width {flow_width} is not a multiple of 64; pass a config JSON (--config)"
            )

    try:
        flow = FlowHeadConfig(
            width=flow_width, depth=len(flow_blocks), num_heads=flow_heads,
            cross_attention=cross, mlp_ratio=flow_ratio, time_embed_dim=time_dim,
        )
        guess = base.replace(
            scales=scales, channels=channels, num_classes=rows - 1, width=dim,
            encoder_depth=len(enc), decoder_depth=len(dec), mlp_ratio=mlp_ratio, flow=flow,
            num_heads=num_heads or 1,  # placeholder until the heads are known
        )
    except ConfigError as err:
        raise CheckpointError(f"the shapes in the state dict give an invalid config: {err}") \
            from None
    if num_heads is None and (enc or dec):
        name = _preset_ignoring_heads(guess)
        if name is None:
            raise CheckpointError(
                "cannot tell the AR head count: the state dict has no attn.rope.freqs buffers "
                f"and its sizes match no preset ({describe_config(guess)}); pass --heads N or a "
                "config JSON"
            )
        guess = guess.replace(num_heads=PRESETS[name].num_heads)
    name = match_preset(guess)
    if not explicit_base and name is not None:
        # Same sizes as a preset: take its other fields too (the release's RoPE grid of 16).
        guess = PRESETS[name].replace(attention=guess.attention)
    return guess


def _doubling_scales(tokens: int) -> tuple[int, ...]:
    sides, total = [], 0
    while total < tokens:
        side = 2 ** len(sides)
        sides.append(side)
        total += side * side
    if total != tokens:
        raise CheckpointError(
            f"cannot tell the scales from {tokens} tokens and there is no 'mask' buffer; "
            "pass a config JSON (--config) with the scales"
        )
    return tuple(sides)


def _preset_ignoring_heads(config: FlowARConfig) -> str | None:
    for name, preset in PRESETS.items():
        if _shape_fields(preset.replace(num_heads=config.num_heads)) == _shape_fields(config):
            return name
    return None


def describe_config(config: FlowARConfig) -> str:
    """One-line summary of a model config's sizes (for error messages and logs)."""
    f = config.flow
    name = match_preset(config)
    return (
        (f"{name}: " if name else "")
        + f"width {config.width}, depth {config.encoder_depth}+{config.decoder_depth}, "
        f"{config.num_heads} heads, flow width {f.width} depth {f.depth} {f.num_heads} heads "
        f"cross={f.cross_attention}, scales {config.scales}, {config.channels} channels, "
        f"{config.num_classes} classes"
    )


# ------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    """What :func:`load_released` returns.

    Attributes:
        model: the FlowAR model in eval mode.
        config: its config (inferred or given).
        entry: which part of the file held the weights ("model_ema", "model", "bare", ...).
        preset: the preset with the same sizes, if any.
        dropped: buffer keys checked and dropped (``mask``).
    """

    model: nn.Module
    config: FlowARConfig
    entry: str
    preset: str | None
    dropped: list[str] = field(default_factory=list)


def _sidecar_config(path: Path) -> FlowARConfig | None:
    """A config stored with a converted file: safetensors metadata or ``<file>.json``."""
    data = None
    if path.suffix == ".safetensors":
        meta = read_safetensors_metadata(path)
        if CONFIG_METADATA_KEY in meta:
            data = json.loads(meta[CONFIG_METADATA_KEY])
    sidecar = path.with_suffix(".json")
    if data is None and sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text()).get("model")
        except (json.JSONDecodeError, AttributeError) as err:
            raise CheckpointError(f"{sidecar} is not a valid config JSON ({err})") from None
    if data is None:
        return None
    try:
        return model_config_from_dict(data)
    except ConfigError as err:
        raise CheckpointError(f"the config stored with {path} is invalid: {err}") from None


def _expected_keys(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".backend." not in k}


def mismatch_report(
    state: Mapping[str, torch.Tensor], model: nn.Module, config: FlowARConfig, source: str
) -> str | None:
    """None when ``state`` fits ``model`` key for key and shape for shape, else a message
    naming the first missing, unexpected and wrongly shaped keys and the config."""
    expected = _expected_keys(model)
    missing = [k for k in expected if k not in state and not k.endswith("rope.freqs")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or wrong):
        return None
    return (
        f"{source} does not match the model config ({describe_config(config)}): "
        f"{len(missing)} missing keys (first: {missing[:3]}), {len(unexpected)} unexpected "
        f"(first: {unexpected[:3]}), {len(wrong)} with another shape (file vs model, first: "
        f"{wrong[:3]}). Check --heads/--preset/--config, or that the file is a FlowAR model"
    )


def _materialise_leftovers(model: nn.Module, device: torch.device | str) -> None:
    """After an ``assign`` load into a meta-built model: recompute RoPE tables and rebuild
    attention backends whose buffers the file does not hold."""
    for module in model.modules():
        if isinstance(module, Rope2d) and module.freqs.is_meta:
            module.freqs = Rope2d(4 * module.freqs.numel(), _rope_base(model)).freqs.to(device)
        backend = getattr(module, "backend", None)
        if isinstance(backend, nn.Module) and any(
            t.is_meta for t in list(backend.parameters()) + list(backend.buffers())
        ):
            with torch.device(device):
                module.backend = build_backend(model.config.attention, module.head_dim)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"the file does not provide {left[:3]} and they cannot be rebuilt")


def load_state_into(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> nn.Module:
    """Load a (possibly wrapped) state dict strictly into a (possibly wrapped) FlowAR model.

    Works across DDP / ``torch.compile`` wrappers on either side; checks and drops ``mask``.
    Returns the model (as passed in).
    """
    state, _ = select_state_dict(state, source)
    target = unwrap_model(model)
    config = target.config
    if MASK_KEY in state:
        check_mask(state.pop(MASK_KEY), config.scales)
    report = mismatch_report(state, target, config, source)
    if report:
        raise CheckpointError(report)
    check_rope_freqs(state, target)
    target.load_state_dict(state, strict=False)
    return model


def load_released(
    source: str | Path | Mapping[str, Any],
    *,
    config: FlowARConfig | None = None,
    heads: int | None = None,
    preset: str | None = None,
    attention: AttentionConfig | None = None,
    prefer_ema: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load released FlowAR weights (or any FlowAR state dict in that layout) strictly.

    Args:
        source: a .pth / .ckpt / .safetensors file, or an already loaded dict.
        config: the model config; default: stored with the file (safetensors metadata or a
            ``.json`` beside it) or inferred from the shapes.
        heads: AR head count when the file has no RoPE buffers to infer it from.
        preset: a preset whose non-shape fields (RoPE grid, ...) seed the inference.
        attention: attention backend to run with (default: exact).
        prefer_ema: use ``model_ema`` over ``model`` in training checkpoints.
        device: where the weights go.
        dtype: cast floating-point weights to this dtype (default: as stored).
    """
    from flowar.model import FlowAR  # the model sits above io in the package layering

    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    name = str(source) if isinstance(source, (str, Path)) else "state dict"
    if isinstance(source, (str, Path)):
        obj = read_weights(source, map_location=device)
        config = config or _sidecar_config(Path(source))
    else:
        obj = source
    state, entry = select_state_dict(obj, name, prefer_ema)
    if config is None:
        config = infer_config(state, heads=heads, base=PRESETS[preset] if preset else None)
    if attention is not None:
        config = config.replace(attention=attention)
    dropped = []
    if MASK_KEY in state:
        check_mask(state.pop(MASK_KEY), config.scales)
        dropped.append(MASK_KEY)
    with torch.device("meta"):
        model = FlowAR(config)
    report = mismatch_report(state, model, config, name)
    if report:
        raise CheckpointError(report)
    check_rope_freqs(state, model)
    model.load_state_dict(state, strict=False, assign=True)
    _materialise_leftovers(model, device)
    if dtype is not None:
        model.to(dtype=dtype)
    model.to(device).eval()
    found = match_preset(config)
    logger.info("loaded %s (%s weights, %s)", name, entry, describe_config(config))
    return LoadedModel(model=model, config=config, entry=entry, preset=found, dropped=dropped)


# ------------------------------------------------------------------------------------------------
# Saving


def released_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the released layout: its own keys (no wrapper prefixes, no
    attention-backend buffers) in module order, with ``mask`` after the position tables."""
    plain = unwrap_model(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in plain.state_dict().items():
        if ".backend." in key:
            continue
        out[key] = value
        if key == "diffusion_pos_embed_learned":
            out[MASK_KEY] = block_causal_mask(plain.config.scales).to(value.device)
    if MASK_KEY not in out:
        raise CheckpointError("the model has no diffusion_pos_embed_learned; not a FlowAR model")
    return out


def config_json(config: FlowARConfig, **extra: Any) -> dict[str, Any]:
    """The JSON written beside a converted file."""
    return {"format": "flowar-released", "layout": "released", "model": to_dict(config),
            "preset": match_preset(config), **extra}


def save_released(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Save ``model`` in the released layout, plus ``<path>.json`` with its config.

    ``.safetensors`` also stores the config in the header; ``.pth``/``.pt`` writes a bare state
    dict, the format the official ``eval.py`` loads. Writes are atomic (temporary file, rename).
    """
    path = Path(path)
    plain = unwrap_model(model)
    state = released_state_dict(plain)
    info = config_json(plain.config, **extra)
    if path.suffix == ".safetensors":
        metadata = {CONFIG_METADATA_KEY: json.dumps(info["model"])}
        write_safetensors_atomic(path, state, metadata=metadata)
    elif path.suffix in (".pth", ".pt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        raise ConfigError(f"cannot save to {path}: use a .safetensors or .pth file name")
    path.with_suffix(".json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    logger.info("saved %s in the released layout (%s)", path, describe_config(plain.config))
    return path


# ------------------------------------------------------------------------------------------------
# Generator for the sample CLI


def load_released_generator(
    checkpoint: str | Path,
    vae: str | Path | None = None,
    *,
    attention: AttentionConfig | None = None,
    heads: int | None = None,
    preset: str | None = None,
    device: str | torch.device = "cpu",
    vae_sample: bool = False,
    vae_config=None,
):
    """A :class:`flowar.pipeline.Generator` from released weights and the MAR KL-16 VAE.

    Args:
        checkpoint: FlowAR weights (.pth / .ckpt / .safetensors, any layout :func:`load_released`
            accepts).
        vae: ``kl16.ckpt`` (or a converted .safetensors); required when the model's tokens have
            the VAE's 16 channels.
        attention: attention backend to sample with.
        heads, preset: passed to :func:`load_released`.
        device: where to run.
        vae_sample: make the codec's encode draw from the posterior (decode is unaffected).
        vae_config: a :class:`flowar.codecs.kl16.KL16Config` for a VAE of other sizes
            (default: the released KL-16).
    """
    from flowar.codecs.kl16 import load_kl16  # codecs and pipeline sit above io
    from flowar.pipeline import Generator

    loaded = load_released(checkpoint, heads=heads, preset=preset, attention=attention,
                           device=device)
    if vae is None:
        raise ConfigError("sampling released weights needs the MAR KL-16 VAE: pass --vae "
                          "kl16.ckpt")
    codec = load_kl16(vae, vae_config, sample_posterior=vae_sample, map_location=device)
    codec = codec.to(device)
    if codec.channels != loaded.config.channels:
        raise ConfigError(f"the VAE makes {codec.channels}-channel latents but the model "
                          f"expects {loaded.config.channels}")
    size = loaded.config.size * codec.stride
    meta = {"dataset": "imagenet", "image_size": size, "num_classes": loaded.config.num_classes,
            "preset": loaded.preset}
    return Generator(loaded.model, codec, meta)
