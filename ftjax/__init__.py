"""ftjax: fine-tune pretrained encoders with JAX, Flax and Optax."""

__version__ = "0.1.0"
