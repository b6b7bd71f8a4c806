"""Fig. 7.1: Chapter 7 regularisers on the ConvNet / CIFAR-10 (experiments/ch7.py)."""
from .ch7 import aggregate, run  # noqa: F401
