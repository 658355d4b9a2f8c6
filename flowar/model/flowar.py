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

    def loss(
        self, full: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> FlowLoss:
        """Flow-matching loss over all scales (label dropout applied in training mode).

        Args:
            full: (B, C, n, n) latent maps.
            labels: (B,) class ids.
            generator: optional generator for times, noise and label dropout.

        Returns:
            total = sum_k (n_k / n_K) * mean squared velocity error at scale k.
        """
        if full.shape[1:] != (self.config.channels, self.config.size, self.config.size):
            raise ValueError(
                f"expected latents of shape (B, {self.config.channels}, {self.config.size}, "
                f"{self.config.size}), got {tuple(full.shape)}"
            )
        if self.training:
            labels = self.drop_labels(labels, generator)
        z = self.condition_all(full, labels)
        targets = scale_targets(full, self.config.scales)
        batch = full.shape[0]
        per_scale, total = [], full.new_zeros(())
        for index, target in enumerate(targets):
            y = to_tokens(target)  # (B, n_k, C)
            t = torch.rand(batch, generator=generator, device=full.device, dtype=full.dtype)
            noise = torch.randn(y.shape, generator=generator, device=full.device, dtype=y.dtype)
            x_t = (1 - t[:, None, None]) * y + t[:, None, None] * noise
            prediction = self.velocity(x_t, t, z[:, self.layout.segment(index)])
            scale_loss = (prediction.float() - (noise - y).float()).pow(2).mean()
            per_scale.append(scale_loss.detach())
            total = total + scale_loss * (self.layout.lengths[index] / self.layout.lengths[-1])
        return FlowLoss(total=total, per_scale=per_scale)
