"""The FlowAR model: block-causal AR transformer over scales plus the per-scale flow head.

The module never decides how it is sampled: :mod:`flowar.flow.sampler` drives
:meth:`FlowAR.start`, :meth:`FlowAR.condition_step` and :meth:`FlowAR.velocity`, and owns the
attention cache. Training calls :meth:`FlowAR.loss` (one teacher-forced pass over all scales).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from flowar.attention.base import AttentionState
from flowar.attention.registry import build_backend
from flowar.config import FlowARConfig
from flowar.model.ar import ARBlock
from flowar.model.flow_head import FlowHead
from flowar.pyramid import ScaleLayout, next_scale_input, scale_targets, to_tokens


@dataclass
class ARCache:
    """Per-layer attention states of one incremental (scale-by-scale) AR pass.

    Owned by the sampling call; :meth:`release` drops every cached tensor.
    """

    encoder: list[AttentionState] = field(default_factory=list)
    decoder: list[AttentionState] = field(default_factory=list)
    scales_done: int = 0

    def nbytes(self) -> int:
        """Memory held by all layers' states."""
        return sum(s.nbytes() for s in self.encoder + self.decoder)

    def release(self) -> None:
        self.encoder.clear()
        self.decoder.clear()


@dataclass
class LossNoise:
    """The random draws of one :meth:`FlowAR.loss` call, drawn up front so that they can be
    drawn once for a whole (global) batch and sliced per process in distributed training.

    Attributes:
        drop: (B,) uniforms; label i is dropped where ``drop[i] < label_drop_prob`` (None: no
            label dropout).
        times: per scale, (B,) flow times in [0, 1).
        noise: per scale, (B, n_k, C) Gaussian noise.
    """

    drop: torch.Tensor | None
    times: list[torch.Tensor]
    noise: list[torch.Tensor]

    def rows(self, index: slice | torch.Tensor) -> LossNoise:
        """The draws of the batch rows ``index``."""
        return LossNoise(
            drop=None if self.drop is None else self.drop[index],
            times=[t[index] for t in self.times],
            noise=[n[index] for n in self.noise],
        )


@dataclass
class FlowLoss:
    """Training loss and its per-scale parts (unweighted)."""

    total: torch.Tensor
    per_scale: list[torch.Tensor]


class FlowAR(nn.Module):
    """Scale-wise autoregressive generator with a flow-matching head.

    Module and parameter names follow the released checkpoints (spec section 5).
    """

    def __init__(self, config: FlowARConfig) -> None:
        super().__init__()
        self.config = config
        self.layout = ScaleLayout(config.scales)
        dim, tokens = config.width, config.num_tokens
        self.grid = config.effective_rope_grid

        def make_backend(head_dim: int):
            return build_backend(config.attention, head_dim)

        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, tokens, dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, tokens, dim))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, tokens, dim))
        self.class_emb = nn.Embedding(config.num_classes + 1, dim)  # last row: null class
        self.z_proj = nn.Linear(config.channels, dim)
        self.z_proj_ln = nn.RMSNorm(dim, eps=1e-6)
        block_args = dict(
            mlp_ratio=config.mlp_ratio, qk_norm=config.qk_norm, logit_scale=config.logit_scale,
            attn_dropout=config.attn_dropout, proj_dropout=config.proj_dropout,
            rope_base=config.rope_base,
        )
        self.encoder_blocks = nn.ModuleList(
            ARBlock(dim, config.num_heads, make_backend(config.head_dim), **block_args)
            for _ in range(config.encoder_depth)
        )
        self.encoder_norm = nn.RMSNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, dim)
        self.decoder_blocks = nn.ModuleList(
            ARBlock(dim, config.num_heads, make_backend(config.head_dim), **block_args)
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.RMSNorm(dim, eps=1e-6)
        self.flownet = FlowHead(config, make_backend)
        self.initialize_weights()

    # ----------------------------------------------------------------------------------------
    # Initialisation (as in the release: Xavier linears, N(0, 0.02) tables, zero output layer)

    def initialize_weights(self) -> None:
        """Re-initialise every parameter."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
        for table in (
            self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
            self.diffusion_pos_embed_learned, self.class_emb.weight,
        ):
            nn.init.normal_(table, std=0.02)
        for layer in (self.flownet.time_embed.mlp[0], self.flownet.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(self.flownet.final_layer.linear.weight)
        nn.init.zeros_(self.flownet.final_layer.linear.bias)

    # ----------------------------------------------------------------------------------------
    # AR transformer

    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) class ids, the null id being ``num_classes`` -> (B, D)."""
        if labels.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"labels must be integer ids, got {labels.dtype}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.config.num_classes):
            raise ValueError(
                f"labels must be in [0, {self.config.num_classes}] "
                f"({self.config.num_classes} = null class), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return self.class_emb(labels)

    def first_scale_input(self, class_vec: torch.Tensor) -> torch.Tensor:
        """AR input of scale 0: the class embedding on every token of the first map."""
        count = self.layout.lengths[0]
        return class_vec[:, None, :].expand(-1, count, -1)  # (B, n_0, D)

    def project_previous(self, previous: torch.Tensor, index: int) -> torch.Tensor:
        """AR input of scale ``index`` >= 1 from the (B, C, s, s) map of scale index - 1."""
        side = self.config.scales[index]
        upsampled = next_scale_input(previous, side, self.config.size)
        return self.z_proj(to_tokens(upsampled))  # (B, s*s, D)

    def _run_ar(
        self,
        x: torch.Tensor,
        class_vec: torch.Tensor,
        positions: slice,
        sides: tuple[int, ...],
        *,
        layout=None,
        cache: ARCache | None = None,
    ) -> torch.Tensor:
        """Encoder + decoder over tokens at ``positions`` -> condition z (B, n, D)."""
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, positions])
        for i, block in enumerate(self.encoder_blocks):
            state = cache.encoder[i] if cache is not None else None
            x = block(x, class_vec, sides, self.grid, layout=layout, state=state)
        x = self.encoder_norm(x)
        x = self.decoder_embed(x) + self.decoder_pos_embed_learned[:, positions]
        for i, block in enumerate(self.decoder_blocks):
            state = cache.decoder[i] if cache is not None else None
            x = block(x, class_vec, sides, self.grid, layout=layout, state=state)
        x = self.decoder_norm(x)
        return x + self.diffusion_pos_embed_learned[:, positions]

    def condition_all(self, full: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced AR pass over all scales with the block-causal mask.

        Args:
            full: (B, C, n, n) full-size latent map.
            labels: (B,) class ids (null id allowed).

        Returns:
            z (B, T, D) for every token of every scale.
        """
        targets = scale_targets(full, self.config.scales)
        class_vec = self.class_embedding(labels)
        pieces = [self.first_scale_input(class_vec)]
        for index in range(1, len(self.config.scales)):
            pieces.append(self.project_previous(targets[index - 1], index))
        x = torch.cat(pieces, dim=1)  # (B, T, D)
        return self._run_ar(
            x, class_vec, slice(0, self.layout.total), self.config.scales,
            layout=self.layout.block_layout(),
        )

    def new_cache(self) -> ARCache:
        """An empty attention cache for one incremental pass."""
        return ARCache(
            encoder=[b.attn.backend.new_state() for b in self.encoder_blocks],
            decoder=[b.attn.backend.new_state() for b in self.decoder_blocks],
        )

    def condition_step(
        self,
        cache: ARCache,
        class_vec: torch.Tensor,
        previous: torch.Tensor | None,
    ) -> torch.Tensor:
        """Incremental AR pass for the next scale.

        Args:
            cache: the pass's cache; records how many scales are done.
            class_vec: (B, D) class embeddings.
            previous: (B, C, s, s) map of the previous scale (None for the first scale).

        Returns:
            z (B, n_k, D) for the tokens of scale k = ``cache.scales_done`` (then incremented).
        """
        index = cache.scales_done
        if index >= len(self.config.scales):
            raise RuntimeError("every scale has already been generated with this cache")
        if index == 0:
            x = self.first_scale_input(class_vec)
        else:
            if previous is None:
                raise ValueError(f"scale {index} needs the previous scale's map")
            x = self.project_previous(previous, index)
        z = self._run_ar(
            x, class_vec, self.layout.segment(index), (self.config.scales[index],), cache=cache
        )
        cache.scales_done += 1
        return z

    # ----------------------------------------------------------------------------------------
    # Flow head and loss

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Velocity (noise - data direction) for tokens x_t (B, n, C) at times t (B,)."""
        return self.flownet(x_t, t, z)

    def drop_labels(self, labels: torch.Tensor, generator=None) -> torch.Tensor:
        """Replace each label by the null class with probability ``label_drop_prob``."""
        if self.config.label_drop_prob == 0:
            return labels
        drop = torch.rand(labels.shape, generator=generator, device=labels.device)
        return torch.where(drop < self.config.label_drop_prob, self.config.null_class, labels)

    def draw_loss_noise(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LossNoise:
        """The random draws of :meth:`loss` for ``batch`` rows, in the order ``loss`` uses.

        Label-dropout uniforms are drawn only in training mode with ``label_drop_prob > 0``;
        then, scale by scale, the times (B,) and the noise (B, n_k, C).
        """
        device = device if device is not None else next(self.parameters()).device
        drop = None
        if self.training and self.config.label_drop_prob > 0:
            drop = torch.rand((batch,), generator=generator, device=device)
        times, noise = [], []
        for length in self.layout.lengths:
            times.append(torch.rand(batch, generator=generator, device=device, dtype=dtype))
            noise.append(torch.randn((batch, length, self.config.channels), generator=generator,
                                     device=device, dtype=dtype))
        return LossNoise(drop, times, noise)

    def loss(
        self,
        full: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        noise: LossNoise | None = None,
    ) -> FlowLoss:
        """Flow-matching loss over all scales (label dropout applied in training mode).

        Args:
            full: (B, C, n, n) latent maps.
            labels: (B,) class ids.
            generator: optional generator for times, noise and label dropout.
            noise: pre-drawn randomness (see :meth:`draw_loss_noise`); replaces ``generator``.

        Returns:
            total = sum_k (n_k / n_K) * mean squared velocity error at scale k.
        """
        if full.shape[1:] != (self.config.channels, self.config.size, self.config.size):
            raise ValueError(
                f"expected latents of shape (B, {self.config.channels}, {self.config.size}, "
                f"{self.config.size}), got {tuple(full.shape)}"
            )
        batch = full.shape[0]
        if noise is None:
            noise = self.draw_loss_noise(batch, generator, device=full.device, dtype=full.dtype)
        elif len(noise.times) != len(self.config.scales) or noise.times[0].shape[0] != batch:
            raise ValueError(f"noise was drawn for another batch or model (batch {batch})")
        if self.training and noise.drop is not None:
            labels = torch.where(noise.drop < self.config.label_drop_prob,
                                 self.config.null_class, labels)
        z = self.condition_all(full, labels)
        targets = scale_targets(full, self.config.scales)
        per_scale, total = [], full.new_zeros(())
        for index, target in enumerate(targets):
            y = to_tokens(target)  # (B, n_k, C)
            t = noise.times[index].to(full.dtype)
            eps = noise.noise[index].to(y.dtype)
            x_t = (1 - t[:, None, None]) * y + t[:, None, None] * eps
            prediction = self.velocity(x_t, t, z[:, self.layout.segment(index)])
            scale_loss = (prediction.float() - (eps - y).float()).pow(2).mean()
            per_scale.append(scale_loss.detach())
            total = total + scale_loss * (self.layout.lengths[index] / self.layout.lengths[-1])
        return FlowLoss(total=total, per_scale=per_scale)
