"""ReSA (Representation Self-Assignment) in JAX/Flax."""

__version__ = '0.1.0'
