"""The patch discriminator of latent diffusion's autoencoder training.

Rombach et al. 2022 (sec. 3, App. G) train the autoencoder with a patch-based adversarial loss,
using the PatchGAN discriminator of Isola et al. 2017 ("Image-to-Image Translation with
Conditional Adversarial Networks", sec. 3.2.2 and App. 6.1.2): a stack of 4x4 convolutions whose
output is one logit per overlapping image patch rather than one per image, so it judges local
texture and leaves the global structure to the reconstruction loss.

Layout (NHWC), with ``C = channels`` and ``n = num_layers``::

    4x4 conv, stride 2, C                                  -> LeakyReLU(0.2)
    for i = 1 .. n - 1: 4x4 conv, stride 2, C min(2^i, 8)  -> GroupNorm -> LeakyReLU(0.2)
    4x4 conv, stride 1, C min(2^n, 8)                      -> GroupNorm -> LeakyReLU(0.2)
    4x4 conv, stride 1, 1                                  -> logits (B, H / 2^n, W / 2^n, 1)

Two departures from the reference, both for small images and stateless training: GroupNorm in
place of BatchNorm (no running statistics to carry in the training state), and 'SAME' padding in
the two stride-1 convolutions (the reference pads by 1, which shrinks a 2x2 map to nothing).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["PatchDiscriminator"]


class PatchDiscriminator(nn.Module, kw_only=True):
    """``x (B, H, W, C_in) -> logits (B, H / 2^num_layers, W / 2^num_layers, 1)``; H and W must be
    multiples of ``2^num_layers``."""

    channels: int = 64
    num_layers: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = 2**self.num_layers
        if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"PatchDiscriminator: expected NHWC images with H and W divisible by 2^num_layers = {f}, "
                f"got shape {tuple(x.shape)}"
            )
        x = x.astype(self.dtype)
        pad = ((1, 1), (1, 1))
        h = nn.Conv(self.channels, (4, 4), strides=2, padding=pad, dtype=self.dtype, name="conv_0")(x)
        h = nn.leaky_relu(h, 0.2)
        for i in range(1, self.num_layers + 1):
            width = self.channels * min(2**i, 8)
            stride = 2 if i < self.num_layers else 1
            h = nn.Conv(
                width,
                (4, 4),
                strides=stride,
                padding=pad if stride == 2 else "SAME",
                use_bias=False,
                dtype=self.dtype,
                name=f"conv_{i}",
            )(h)
            h = nn.GroupNorm(num_groups=math.gcd(32, width), dtype=self.dtype, name=f"norm_{i}")(h)
            h = nn.leaky_relu(h, 0.2)
        return nn.Conv(1, (4, 4), padding="SAME", dtype=self.dtype, name="conv_out")(h).astype(jnp.float32)
