"""Few-row CPU products that stream their weights (``cpukernels.c``), for inference.

A decode step or an expert with a handful of tokens multiplies 1-8 rows by a weight read once
from memory. MKL, oneDNN and OpenBLAS pack the weight into panels first, a second pass over
memory that only pays off when many rows reuse it: on few rows they read the weight at a third
to a half of the machine's read bandwidth. The C kernels here read each weight element once,
in address order, split the output columns between the calling thread and one worker thread,
and reach the bandwidth (fp32 and bf16 weights; activations and sums in fp32).

The source is compiled once per machine with the system C compiler (``cc``, or ``$CC``) into
``$XDG_CACHE_HOME/workbench`` (default ``~/.cache/workbench``) and loaded with ctypes. Without
a compiler, or on a CPU without AVX2 and FMA, or with ``WORKBENCH_CPU_KERNELS=0``,
``available()`` is False and the torch backend uses torch's own products.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpukernels.c")
MAX_LINEAR_ROWS = 4  # linear() serves products with at most this many rows
MIN_LINEAR_BYTES = 64 * 1024  # and weights at least this large (smaller: torch is as fast)
MAX_EXPERT_ROWS = 64  # experts with more rows than this reuse the weight enough for torch's GEMM
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error = ""
_threads = threading.local()


def cache_dir() -> Path:
    """Where the compiled library is kept."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "workbench"


def _compile() -> ctypes.CDLL:
    src = SOURCE.read_bytes()
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(src + cc.encode() + platform.machine().encode()).hexdigest()[:16]
    out = cache_dir() / f"cpukernels-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cc, "-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-pthread", str(SOURCE),
               "-o", tmp, "-lm"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise OSError(f"{' '.join(cmd)} failed: {res.stderr.strip()[:500]}")
            os.replace(tmp, out)  # atomic: concurrent builders each write their own file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    vp, lg, it = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.wb_supported.restype = it
    lib.wb_linear.argtypes = [vp, lg, lg, vp, lg, it, vp, it]
    lib.wb_linear.restype = it
    lib.wb_experts.argtypes = [vp, vp, vp, vp, lg, vp, vp, lg, lg, it, vp, it]
    lib.wb_experts.restype = it
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels (compiled on first use), or None where they cannot run here."""
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("WORKBENCH_CPU_KERNELS", "1") == "0":
                _error = "disabled by WORKBENCH_CPU_KERNELS=0"
            elif platform.machine().lower() not in ("x86_64", "amd64"):
                _error = f"needs an x86-64 CPU, not {platform.machine()}"
            else:
                try:
                    lib = _compile()
                    if lib.wb_supported():
                        _lib = lib
                    else:
                        _error = "this CPU lacks AVX2 or FMA"
                except (OSError, subprocess.SubprocessError) as e:
                    _error = f"could not build the kernels: {e}"
            _tried = True
    return _lib


def available() -> bool:
    """True when the streaming kernels run on this machine."""
    return library() is not None


def why_unavailable() -> str:
    """Why ``available()`` is False ("" when it is True)."""
    library()
    return _error


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_DEFAULT_THREADS = min(2, _cpus())


def threads() -> int:
    """Threads the kernels split their work over (the calling thread and at most one
    worker): ``using(n)``'s setting on this thread, else 2 where two CPUs are free."""
    n = getattr(_threads, "n", None)
    return _DEFAULT_THREADS if n is None else n


@contextlib.contextmanager
def using(n: int | None) -> Iterator[None]:
    """Run the kernels on ``n`` threads (1 or 2) inside the block; None keeps the default."""
    before = getattr(_threads, "n", None)
    _threads.n = before if n is None else max(1, min(2, int(n)))
    try:
        yield
    finally:
        _threads.n = before


_DTYPES = (torch.float32, torch.bfloat16)


def serves(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x`` times ``w`` can go through the kernels: CPU inference (no autograd, not
    inside torch.compile), fp32 or bf16 throughout, contiguous x and w."""
    return (x.device.type == "cpu" and x.dtype == w.dtype and x.dtype in _DTYPES
            and not torch.is_grad_enabled() and x.is_contiguous() and w.is_contiguous()
            and not torch.compiler.is_compiling() and library() is not None)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w.T for w (O, K) (x contiguous, its dtype w's); bf16: sums in fp32,
    rounded once."""
    O, K = w.shape
    y = torch.empty((*x.shape[:-1], O), dtype=x.dtype)
    if library().wb_linear(x.data_ptr(), x.numel() // K, K, w.data_ptr(), O,
                           x.dtype == torch.bfloat16, y.data_ptr(), threads()):
        raise MemoryError(f"no memory for the scratch of a ({x.numel() // K}, {K}) product")
    return y


def experts(xin: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, start: torch.Tensor,
            count: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Rows ``start[j] .. start[j] + count[j]`` of xin (A, D) through expert ``ids[j]``'s
    SwiGLU into the same rows of ``out`` (int64 index tensors; gate_up (E, D, 2I), down
    (E, I, D) contiguous, every tensor in xin's dtype); bf16 rounds each intermediate to bf16
    as the model computes it."""
    D, I = down.shape[2], down.shape[1]
    if library().wb_experts(xin.data_ptr(), start.data_ptr(), count.data_ptr(), ids.data_ptr(),
                            len(ids), gate_up.data_ptr(), down.data_ptr(), D, I,
                            xin.dtype == torch.bfloat16, out.data_ptr(), threads()):
        raise MemoryError(f"no memory for the scratch of experts with D={D}, I={I}")
