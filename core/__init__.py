"""DeCo: frequency-decoupled pixel diffusion (Ma et al., arXiv 2511.19365).

`deco.reference` is the float64 NumPy/SciPy reference, `deco.optimized` the PyTorch
implementation, `deco.config` the configuration both share. Importing `deco` imports neither
NumPy nor torch.
"""

from deco.config import PRESETS, DeCoConfig

__version__ = "0.1.0"
__all__ = ["PRESETS", "DeCoConfig", "__version__"]
