"""lipexp: the Lipschitz continuity of neural networks, reproduced figure by figure.

The library holds the math and mechanisms and knows nothing of Hydra:
- ``lipexp.spectral``: singular-value Jacobian and Hessian in closed form (Chapter 3)
- ``lipexp.bounds``: layer operator norms, network upper/lower Lipschitz bounds, K(0) at initialisation
- ``lipexp.activations``: Lipschitz constants of activations (Table 2.1)
- ``lipexp.dynamics``: per-layer drift mu, diffusion lambda, noise-curvature kappa, predicted K(t) (Chapter 4)
- ``lipexp.layers`` / ``lipexp.handlers``: which weights K(t) tracks, and one tracker handler per layer type
- ``lipexp.fourier``: spectral bound of K and frequency responses (Chapter 5)
- ``lipexp.landscape``: loss/Lipschitz landscapes, Hessian sharpness
- ``lipexp.frequency`` / ``lipexp.iaside`` / ``lipexp.perturbations`` / ``lipexp.zoo``: frequency filters,
  I-ASIDE Shapley values, perturbations and attacks, the Chapter 6 model zoo
- ``lipexp.data``, ``lipexp.models``, ``lipexp.train``: datasets, thesis models, the SGD loop
  (``lipexp.batches``: how it batches the project's datasets, any torch Dataset or a DataLoader)
- ``lipexp.monitor``, ``lipexp.lightning``, ``lipexp.plots``: the tracker in your own loop, a PyTorch
  Lightning callback, ``k_curves`` for your own run
"""
__version__ = "0.1.0"
