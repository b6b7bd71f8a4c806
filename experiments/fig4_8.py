"""Fig. 4.8: observed vs predicted K(t) with dropout, weight decay, AutoAugment and FGSM training."""
from .fig4_2 import aggregate, run  # noqa: F401  (same job and plot; only the regularisers differ)
