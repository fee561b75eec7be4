"""moe_jax: sparse Mixture-of-Experts language models in JAX and flax.nnx."""

from moe_jax import platforms as _platforms

_platforms.quiet_without_tpu()  # before any jax backend starts: no libtpu error block on CPU-only machines

__version__ = "0.1.0"
