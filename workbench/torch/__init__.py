"""PyTorch backend: ``workbench.torch.load(path, dtype, device)``. Kernels only; the forward
itself is ``workbench.forward``."""

from .model import Params, TorchModel, load
from .ops import TorchOps

__all__ = ["Params", "TorchModel", "TorchOps", "load"]
