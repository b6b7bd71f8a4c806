"""lipexp: the Lipschitz continuity of neural networks, reproduced figure by figure.

The library holds the math and mechanisms and knows nothing of Hydra:
- ``lipexp.spectral``: singular-value derivatives (Chapter 3), operator norms, Lipschitz bounds
- ``lipexp.dynamics``: per-layer drift mu, diffusion lambda, noise-curvature kappa, predicted K(t) (Chapter 4)
- ``lipexp.fourier``: spectral bound of K and frequency responses (Chapter 5)
- ``lipexp.frequency`` / ``lipexp.iaside``: frequency filters, I-ASIDE Shapley values (Chapter 6)
- ``lipexp.data``, ``lipexp.models``, ``lipexp.train``: datasets, thesis models, the SGD loop
"""
__version__ = "0.1.0"
