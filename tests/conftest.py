import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# One JAX compilation cache for the whole test session (and the kernels and subprocesses it
# starts): a model loaded again, or a second model of the same shape and dtype, reuses the
# programs compiled for the first instead of compiling them again. Set before jax is imported;
# a cache dir the caller chose is kept as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="workbench-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
