"""Fig. 7.2: Chapter 7 regularisers on the MLP / MNIST (experiments/ch7.py)."""
from .ch7 import aggregate, run  # noqa: F401
