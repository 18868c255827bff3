"""The decode layout: a policy resharded once, from the training layout into one for generating.

    decoder = Decoder.create(cfg, partitioner)          # DecodeLayout(tensor=0): per host
    weights = decoder.weights(params)                   # one program: cast + reshard
    out = decoder.generate(weights, tokens, mask, keys, max_new_tokens=256, temperature=0.7)

In the training layout every weight's embed axis is split over `fsdp`, so each decode step
would all-gather the whole model (in fp32) to produce one token per row. The decode layout
(Partitioner.decoding) splits every weight along heads / MLP / vocab over `tensor` devices and
keeps embed whole; the remaining devices hold copies and split the batch. A decode step then
moves activations only (an all-reduce of [B, 1, embed] per projection pair), never weights.
The copy is in the compute dtype: per device it costs (parameters x 2 bytes for bf16) /
tensor, on top of the training layout's shards (README, "What fits where").

tensor=0 means this host's device count, capped to a divisor of the KV heads (8 for Llama-2
70B; a tiny model with 2 KV heads on 8 devices decodes at tensor 2 over 4 copies): tensor
parallelism stays inside a host (fast links), each host decodes its own rows, and the KV cache
splits with the heads. Set `decoding.DecodeLayout.tensor` lower to trade memory
for fewer collectives, or to match another run's layout exactly (tensor-parallel matmuls sum in
another order, so a different `tensor` can change a sampled token where two logits tie to
rounding).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from xwin_jax import sampling
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.spec import LM, compute_weights, spec
from xwin_jax.partitioning import Partitioner


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """How many devices each weight is split over while decoding (0: this host's devices)."""
    tensor: int = 0


@dataclasses.dataclass
class Decoder:
    cfg: LlamaConfig
    partitioner: Partitioner  # the decode layout's
    shardings: Any  # of the weights in the decode layout

    @classmethod
    def create(cls, cfg: LlamaConfig, training: Partitioner,
               layout: DecodeLayout | None = None) -> "Decoder":
        """The decode layout for `cfg` on the training partitioner's devices. tensor=0: this
        host's devices, capped to a divisor of the KV heads (gcd), so that the K/V
        projections and the KV cache split too instead of staying whole on every device."""
        tensor = (layout or DecodeLayout()).tensor
        if not tensor:
            here = sum(d.process_index == jax.process_index() for d in training.mesh.devices.flat)
            tensor = math.gcd(here, cfg.num_kv_heads)
        decode = training.decoding(tensor)
        return cls(cfg, decode, spec(LM).shardings(cfg, decode))

    def weights(self, params: Any) -> Any:
        """Params in any layout (the training one) → this layout, in the compute dtype: cast
        where they are (each shard on its device, an elementwise program that keeps the
        layout), then moved device to device (device_put reshards between meshes whatever
        their device order; jit would refuse a TPU mesh's topology order)."""
        if not hasattr(self, "_cast"):
            self._cast = jax.jit(lambda p: compute_weights(p, self.cfg.dtype))
        return jax.device_put(self._cast(params), self.shardings)

    def abstract_weights(self) -> Any:
        """ShapeDtypeStructs of weights() with their shardings (for AOT plans)."""
        shapes = jax.eval_shape(lambda p: compute_weights(p, self.cfg.dtype),
                                spec(LM).shapes(self.cfg))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.shardings)

    def generate(self, weights: Any, prompt_tokens, prompt_mask, keys: jax.Array,
                 **settings: Any) -> sampling.Generation:
        """sampling.generate on this layout: the whole batch given on every host."""
        return sampling.generate(weights, self.cfg, prompt_tokens, prompt_mask, keys,
                                 partitioner=self.partitioner, **settings)
