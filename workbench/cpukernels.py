"""Few-row CPU products that stream their weights (``cpukernels.c``), for inference, shared
by the torch backend (ctypes) and the jax backend (an XLA FFI custom call).

A decode step or an expert with a handful of tokens multiplies 1-8 rows by a weight read once
from memory. MKL, oneDNN and OpenBLAS pack the weight into panels first, a second pass over
memory that only pays off when many rows reuse it: on few rows they read the weight at a third
to a half of the machine's read bandwidth. The C kernels here read each weight element once,
in address order, split the output columns between the calling thread and one worker thread,
and reach the bandwidth (fp32 and bf16 weights; activations and sums in fp32).

The source is compiled once per machine with the system C compiler (``cc``, or ``$CC``) into
``$XDG_CACHE_HOME/workbench`` (default ``~/.cache/workbench``) and loaded with ctypes. Without
a compiler, or on a CPU without AVX2 and FMA, or with ``WORKBENCH_CPU_KERNELS=0``,
``available()`` is False and the backends use their own products. The jax custom call is
built the same way, with the C++ compiler (``c++``, or ``$CXX``) and jax's FFI headers.
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

SOURCE = Path(__file__).with_name("cpukernels.c")
FFI_SOURCE = Path(__file__).with_name("cpukernels_ffi.cc")
MAX_LINEAR_ROWS = 4  # the backends send products with at most this many rows
MIN_LINEAR_BYTES = 64 * 1024  # and weights at least this large (smaller: the library is as fast)
MAX_EXPERT_ROWS = 64  # experts with more rows reuse their weights enough for the library's GEMM
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_ffi: ctypes.CDLL | None = None
_tried = False
_error = ""
_threads = threading.local()


def attention_shapes(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...]) -> bool:
    """Whether the decode attention kernel takes these shapes: one query per head q (B, H, 1,
    d) over keys and values (B, K, T, d), T >= 1, K dividing H, d at most 1024."""
    return (len(q) == len(k) == 4 and q[2] == 1 and tuple(k) == tuple(v) and q[0] == k[0]
            and q[3] == k[3] <= 1024 and k[1] > 0 and q[1] % k[1] == 0 and k[2] > 0)


def cache_dir() -> Path:
    """Where the compiled library is kept."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "workbench"


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise OSError(f"{' '.join(cmd)} failed: {res.stderr.strip()[:500]}")


def _build(name: str, sources: list[Path], include: str | None = None) -> Path:
    """The shared library ``name`` built from ``sources`` (C, and C++ against ``include``),
    cached under a key of the sources and compilers; built once, atomically."""
    cc, cxx = os.environ.get("CC", "cc"), os.environ.get("CXX", "c++")
    h = hashlib.sha256()
    for part in [*(p.read_bytes() for p in sources), cc.encode(), cxx.encode(),
                 platform.machine().encode(), str(include).encode()]:
        h.update(part)
    out = cache_dir() / f"{name}-{h.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs = []
        for src in sources:
            obj = os.path.join(tmp, src.name + ".o")
            if src.suffix == ".c":
                _run([cc, "-O3", "-mavx2", "-mfma", "-fPIC", "-pthread", "-c", str(src),
                      "-o", obj])
            else:
                _run([cxx, "-O2", "-std=c++17", "-fPIC", "-I", str(include), "-c", str(src),
                      "-o", obj])
            objs.append(obj)
        so = os.path.join(tmp, "lib.so")
        _run([cxx if include else cc, "-shared", "-pthread", *objs, "-o", so, "-lm"])
        os.replace(so, out)  # atomic: concurrent builders each write their own file
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    vp, lg, it = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.wb_supported.restype = it
    lib.wb_linear.argtypes = [vp, lg, lg, vp, lg, it, vp, it]
    lib.wb_linear.restype = it
    lib.wb_experts.argtypes = [vp, vp, vp, vp, lg, vp, vp, lg, lg, it, vp, it]
    lib.wb_experts.restype = it
    lib.wb_rms_norm.argtypes = [vp, lg, lg, vp, ctypes.c_float, it, vp]
    lib.wb_rms_norm.restype = None
    lib.wb_rope.argtypes = [vp, lg, lg, lg, lg, lg, lg, lg, vp, vp, lg, it, vp]
    lib.wb_rope.restype = None
    lib.wb_attn1.argtypes = [vp, lg, lg, lg, lg, lg, lg, lg, vp, lg, lg, lg, vp, lg, lg, lg,
                             ctypes.c_float, it, vp, it]
    lib.wb_attn1.restype = it
    lib.wb_set_by_expert.argtypes = [it]
    lib.wb_set_by_expert.restype = None
    lib.wb_set_avx512.argtypes = [it]
    lib.wb_set_avx512.restype = it
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
                    lib = _load(_build("cpukernels", [SOURCE]))
                    if lib.wb_supported():
                        _lib = lib
                    else:
                        _error = "this CPU lacks AVX2 or FMA"
                except (OSError, subprocess.SubprocessError) as e:
                    _error = f"could not build the kernels: {e}"
            _tried = True
    return _lib


def ffi_library(include: str) -> ctypes.CDLL:
    """The kernels with their XLA FFI handlers (built against the FFI headers in
    ``include``), for a backend that checked ``available()``; OSError when the C++ build
    fails."""
    global _ffi
    with _lock:
        if _ffi is None:
            _ffi = _load(_build("cpukernels-ffi", [SOURCE, FFI_SOURCE], include))
    return _ffi


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
