"""mvhan_jax: accelerator-native retrieval and multi-scenario ranking in JAX/Flax."""

__version__ = "0.1.0"
