"""PyTorch backend: ``workbench.torch.load(path, dtype)``; mirrors ``workbench.jax`` file by
file."""

from .model import Params, TorchModel, forward, load

__all__ = ["TorchModel", "Params", "forward", "load"]
