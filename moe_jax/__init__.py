"""moe_jax: sparse Mixture-of-Experts language models in JAX and flax.nnx."""

__version__ = "0.1.0"
