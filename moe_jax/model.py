"""Compatibility shim: the decoder-only LM now lives in `moe_jax.models.decoder`, its building blocks in
`moe_jax.models.layers`. `from moe_jax import model` keeps working for notebooks, tests and scripts; new code
picks a family with `moe_jax.models.get(config)` and uses its interface (create, loss_fn, abstract_batch,
count_params, flops_per_token)."""

from moe_jax.models.decoder import (BATCH_FORMAT, Block, DecoderLayer, Transformer, abstract_batch,  # noqa: F401
                                    count_params, create, default_config, describe, flops_per_token,
                                    layers_per_block, loss_fn, num_blocks, validate_config)
from moe_jax.models.layers import (ACTIVATIONS, DTYPES, REMAT_POLICIES, Attention, Mlp,  # noqa: F401
                                   attention_mask, head_dim, is_moe, make_moe_layer, rotary)
