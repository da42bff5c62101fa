"""workbench: a research workbench for Llama-4-style Mixture-of-Experts models.

``import workbench`` imports neither torch nor jax; a backend is imported when first used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint, CheckpointError
from .config import ConfigError, ModelConfig
from .hooks import HookError, hook_names
from .interventions import (
    InterventionError,
    ablate_head,
    ban_expert,
    disable_temperature,
    force_expert,
    patch,
    set_top_k,
    zero_expert,
)
from .model import DTYPES, CaptureTooLarge, DeviceError, InputError, Model, NonFiniteError, Output
from .trace import Routing, Trace, TraceError

if TYPE_CHECKING:
    from .parity import ParityReport
    from .tokenizer import Tokenizer

__version__ = "0.1.0"
BACKENDS = ("torch", "jax")


def load(path: str | Path, backend: str = "torch", dtype: str = "float32",
         device: Any = None, offload: str | None = None,
         max_memory: int | str | None = None,
         max_position_embeddings: int | None = None, threads: int | None = None,
         expert_parallel: bool = False, mesh: Any = None,
         quant: str | None = None, compile: bool | dict[str, Any] = False) -> Model:
    """Load a Llama 4 checkpoint directory on ``backend`` ("torch" | "jax") in ``dtype``.

    ``device``: torch takes "cpu", "cuda", "cuda:N", "mps" or a torch.device; jax takes a
    ``jax.Device`` or a platform name ("cpu", "gpu", "tpu", optionally ":N"). The default is
    the backend's default device. Weights are held once: on the CPU, tensors already in
    ``dtype`` are used in place from the memory-mapped files.

    ``offload="disk"`` opens checkpoints larger than memory: each layer's dense weights are read
    to the device just before use (the next layer prefetched meanwhile) and dropped after, and
    only the experts the router chose are read, through an LRU cache of ``max_memory`` bytes
    (an int or a string like "6GB"; default: no cache). ``model.io_stats()`` reports the reads.

    ``max_position_embeddings`` replaces the config's limit on sequence length (e.g. to study a
    small model far past the context it was trained on; RoPE and the query temperature are
    defined at every position, but the model never saw those past its training length).

    ``threads`` (torch) fixes the intra-op threads of every forward; by default a CPU forward
    over fewer than 64 positions (a decode step) runs on one thread and larger ones use
    torch's setting (``model.threads`` can be changed later). On the CPU the few-row products
    (decode steps, the expert phase) go through ``workbench.cpukernels``, streaming kernels
    that split each product between the calling thread and one worker thread of their own;
    ``threads=1`` keeps them on the calling thread too. jax's CPU thread pool is fixed
    when jax starts (``XLA_FLAGS``), so the jax backend refuses ``threads``.

    ``compile=True`` (torch) runs each decoder layer as a ``torch.compile``d step (CUDA
    graphs on CUDA; a dict passes ``torch.compile`` keyword arguments; see
    ``TorchModel.set_compile``). The jax backend always compiles its steps.

    ``expert_parallel=True`` shards each MoE layer's experts: jax over ``jax.devices()`` on a
    mesh axis named "expert" (or over ``mesh=``, a ``jax.sharding.Mesh`` with an "expert" and
    optionally a "data" axis); torch over the ``torch.distributed`` process group the caller
    initialised, each rank loading (or, with ``offload="disk"``, reading) only its E/N experts.
    Tokens reach their experts by all-to-all; results, hooks and interventions are those of
    one device. On torch every rank runs the same ``run`` call and returns the same Output.

    FP8 checkpoints (compressed-tensors, e.g. Maverick-FP8 or ``workbench quantize`` output)
    keep their routed experts in FP8, resident or streamed, dequantised at use. ``quant``:
    "weights" (the default for them) runs activations in ``dtype``; "w8a8" also quantises
    each expert matmul's input per token to FP8, as vLLM-style servers do.
    """
    if backend == "torch":
        from .torch import load as _load
    elif backend == "jax":
        from .jax import load as _load
    else:
        raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} not supported; choose one of {DTYPES}")
    if threads is not None:
        if backend != "torch":
            raise ValueError("threads= applies to the torch backend; jax sizes its CPU thread "
                             "pool when it starts (set XLA_FLAGS before importing jax)")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r} must be an int >= 1 (or None)")
    if compile is not False and backend != "torch":
        raise ValueError("compile= applies to the torch backend; the jax backend always "
                         "compiles its steps")
    if not isinstance(expert_parallel, bool):
        raise ValueError(f"expert_parallel={expert_parallel!r} must be True or False")
    if mesh is not None and backend != "jax":
        raise ValueError("mesh= is a jax.sharding.Mesh for backend='jax'; the torch backend "
                         "shards experts over its process group with expert_parallel=True")
    parallel: dict[str, Any] = {}
    if expert_parallel or mesh is not None:
        parallel = {"expert_parallel": True} if backend == "torch" else \
            {"expert_parallel": True, "mesh": mesh}
    model = _load(path, dtype=dtype, device=device, offload=offload, max_memory=max_memory,
                  quant=quant, **parallel)
    if threads is not None:
        model.threads = threads
    if compile is not False:
        model.set_compile(compile)
    if max_position_embeddings is not None:
        model.set_max_positions(max_position_embeddings)
    return model


def compare(model_a: Model, model_b: Model, input_ids: Any, capture: Any = "*",
            **kwargs: Any) -> ParityReport:
    """Run both models on the same ids and report per-hook errors and routing agreement."""
    from .parity import compare as _compare
    return _compare(model_a, model_b, input_ids, capture=capture, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    if name == "ParityReport":
        from .parity import ParityReport
        return ParityReport
    if name in ("ImageProcessor", "Processor", "VisionError"):
        from .vision import processor
        return getattr(processor, name)
    if name in ("analysis", "plots", "widgets", "parity", "vision", "data"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


__all__ = [
    "BACKENDS", "CaptureTooLarge", "Checkpoint", "CheckpointError", "ConfigError",
    "DeviceError", "HookError", "ImageProcessor", "NonFiniteError", "Processor", "TraceError",
    "VisionError",
    "InputError", "InterventionError", "Model", "ModelConfig", "Output", "ParityReport", "Routing",
    "Tokenizer", "Trace", "ablate_head",
    "ban_expert", "compare", "disable_temperature", "force_expert", "hook_names", "load",
    "patch", "set_top_k", "zero_expert",
]
