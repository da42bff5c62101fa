"""Shared by the benchmarks: seeded synthetic checkpoints at real sizes, and memory sampling.

``ensure_checkpoint(path, cfg, seed)`` writes a bf16 checkpoint of ``cfg`` (seeded normal
weights * 0.02, norms 1) into ``path`` tensor chunk by tensor chunk (never more than ~50 MB of
weights in memory per writer), in the layout ``Checkpoint.save`` writes (HF names, <= 2 GiB
shards, ``model.safetensors.index.json``, text-only ``config.json``), so that both ``wb.load``
and transformers' ``from_pretrained`` read it. A marker written last says the folder is
complete; a later call with the same spec reuses it. Every tensor has its own generator
(seed, crc32 of its name), so the bytes do not depend on how many processes write the shards.

``proc_status`` / ``Sampler`` read RssAnon (and RssFile) from ``/proc/PID/status``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from workbench.checkpoint import INDEX_FILE, Checkpoint, expected_shapes
from workbench.config import ModelConfig
from workbench.hooks import layer_of

ROOT = Path(__file__).resolve().parent.parent
CACHE_ROOT = ROOT / "benchmarks" / ".cache"
MARKER = ".complete.json"
MAX_SHARD_BYTES = 2 * 1024**3  # Checkpoint.save's default
CHUNK = 8 * 2**20  # elements generated at a time (32 MB of float32)
STD = 0.02
GB = 1e9
SAMPLE_S = 0.005


# ----------------------------------------------------------------------------- the checkpoint


def hf_name(name: str) -> str:
    """Canonical name -> the text-only HF name (what ``Checkpoint.save`` writes)."""
    return name if name.startswith("lm_head.") else "model." + name


def shard_plan(cfg: ModelConfig) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Canonical (name, shape) per shard, ordered and grouped as ``Checkpoint.save`` does."""
    shapes = expected_shapes(cfg)

    def order(name: str) -> tuple[int, str]:
        lay = layer_of(name)
        return (-1 if name.startswith("embed") else 10**9 if lay is None else lay, name)

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name in sorted(shapes, key=order):
        nbytes = math.prod(shapes[name]) * 2
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shapes[name]))
        size += nbytes
    return shards


def tensor_chunks(name: str, shape: tuple[int, ...], seed: int) -> Iterator[np.ndarray]:
    """The tensor's bf16 values (flat, C order) in chunks: norms 1, else N(0, 1) * 0.02."""
    n = math.prod(shape)
    if name.endswith("norm.weight"):
        yield np.ones(n, ml_dtypes.bfloat16)
        return
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    buf = np.empty(min(n, CHUNK), np.float32)
    done = 0
    while done < n:
        m = min(CHUNK, n - done)
        out = buf[:m]
        rng.standard_normal(out=out, dtype=np.float32)
        out *= STD
        yield out.astype(ml_dtypes.bfloat16)
        done += m


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    """Stream one safetensors file (the header ``write_safetensors`` writes); its data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        header[hf_name(name)] = {"dtype": "BF16", "shape": list(shape),
                                 "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape in tensors:
            for chunk in tensor_chunks(name, shape, seed):
                fh.write(chunk.view(np.uint16).data)
    tmp.replace(path)
    return offset


def marker_spec(cfg: ModelConfig, seed: int) -> dict[str, Any]:
    shards = shard_plan(cfg)
    return {"seed": seed, "std": STD, "config": cfg.to_hf_dict(),
            "tensors": {hf_name(n): list(s) for shard in shards for n, s in shard}}


def is_complete(path: Path, cfg: ModelConfig, seed: int) -> bool:
    """A complete checkpoint with this spec is at ``path``."""
    marker = path / MARKER
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("spec") == marker_spec(cfg, seed)
    except json.JSONDecodeError:
        return False


def ensure_checkpoint(path: Path, cfg: ModelConfig, seed: int, workers: int = 1) -> bool:
    """Write the checkpoint unless a complete one with the same spec is there; True if written.
    ``workers`` > 1 writes that many shards at a time in subprocesses (same bytes)."""
    spec = marker_spec(cfg, seed)
    if is_complete(path, cfg, seed):
        return False
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    shards = shard_plan(cfg)
    total = sum(math.prod(s) * 2 for shard in shards for _, s in shard)
    print(f"writing {total / GB:.2f} GB bf16 checkpoint to {path} ({len(shards)} shards, "
          f"{workers} writer(s)) ...", flush=True)
    t0 = time.perf_counter()
    cfg_dict = cfg.to_hf_dict()
    cfg_dict["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {hf_name(n): fname for fname, shard in zip(names, shards) for n, _ in shard}
    written = 0
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            futs = [pool.submit(write_shard, path / f, s, seed) for f, s in zip(names, shards)]
            for fname, shard, fut in zip(names, shards, futs):
                written += fut.result()
                print(f"  {fname}: {len(shard)} tensors, {written / GB:.2f} GB so far "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        for fname, shard in zip(names, shards):
            written += write_shard(path / fname, shard, seed)
            print(f"  {fname}: {len(shard)} tensors, {written / GB:.2f} GB so far "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    index = {"metadata": {"total_size": written}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    Checkpoint.open(path).close()  # headers, names and shapes validate (reads no data)
    (path / MARKER).write_text(json.dumps({"spec": spec, "bytes": written,
                                           "written_s": time.perf_counter() - t0}) + "\n")
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return True


def warm_page_cache(path: Path) -> float:
    """Read every shard once (so each loader starts from the same warm cache); seconds."""
    t0 = time.perf_counter()
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 * 2**20):
                pass
    return time.perf_counter() - t0


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop the (clean) cached pages of every shard: the next read is cold.
    ``posix_fadvise(DONTNEED)`` needs no privileges; pages another process maps stay."""
    for f in sorted(path.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- memory


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """RssAnon, RssFile, RssShmem, VmRSS, VmHWM of a process, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class Sampler(threading.Thread):
    """Samples a process's RssAnon / RssFile every ``interval`` s (time.monotonic stamps).
    ``limit``: call ``on_limit`` once when RssAnon passes it; ``min_available``: the same
    when the machine's MemAvailable falls below it (other jobs share the machine)."""

    def __init__(self, pid: int | str = "self", interval: float = SAMPLE_S,
                 limit: int | None = None, on_limit: Any = None,
                 min_available: int | None = None):
        super().__init__(daemon=True)
        self.pid, self.interval, self.limit, self.on_limit = pid, interval, limit, on_limit
        self.min_available = min_available
        self.samples: list[tuple[float, int, int]] = []
        self.halt = threading.Event()
        self.tripped = False
        self.why = ""

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            try:
                s = proc_status(self.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            anon = s.get("RssAnon", 0)
            self.samples.append((time.monotonic(), anon, s.get("RssFile", 0)))
            why = ""
            if self.limit is not None and anon > self.limit:
                why = f"RssAnon {anon / GB:.2f} GB passed the {self.limit / GB:.1f} GB guard"
            elif self.min_available is not None and n % 20 == 0:
                avail = mem_available()
                if avail < self.min_available:
                    why = (f"MemAvailable {avail / GB:.2f} GB fell below "
                           f"{self.min_available / GB:.1f} GB")
            if why and not self.tripped:
                self.tripped, self.why = True, why
                if self.on_limit is not None:
                    self.on_limit()
            n += 1
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join()

    def peak(self, t0: float = -math.inf, t1: float = math.inf) -> tuple[int, int]:
        """(peak RssAnon, number of samples) between t0 and t1."""
        window = [a for t, a, _ in self.samples if t0 <= t <= t1]
        return (max(window) if window else 0), len(window)


def code_version() -> dict[str, Any]:
    """The workbench code measured: git commit and whether workbench/ has local changes."""
    out: dict[str, Any] = {"root": str(ROOT)}
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "workbench"], capture_output=True, text=True, timeout=30)
        if head.returncode == 0:
            out["commit"] = head.stdout.strip()
            out["workbench_changed_files"] = len(dirty.stdout.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


class ChildRun:
    """A finished sampled subprocess: its stdout/stderr, the parent's sampler, wall time, and
    ``result``: the JSON of its last ``RESULT `` line (None when it has none or failed)."""

    def __init__(self, proc: subprocess.Popen, out: str, err: str, sampler: Sampler,
                 timed_out: bool, wall: float, timeout: float):
        self.returncode, self.out, self.err = proc.returncode, out, err
        self.sampler, self.timed_out, self.wall = sampler, timed_out, wall
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        ok = proc.returncode == 0 and bool(lines)
        self.result: dict[str, Any] | None = json.loads(lines[-1][len("RESULT "):]) if ok else None
        self.why = ("" if ok else
                    f"timed out after {timeout:.0f} s" if timed_out else
                    f"killed: {sampler.why}" if sampler.tripped else
                    f"exit code {proc.returncode}")


def run_sampled(cmd: list[str], timeout: float, limit: int | None = None,
                min_available: int | None = None, interval: float = SAMPLE_S) -> ChildRun:
    """Runs ``cmd`` in a fresh subprocess whose RssAnon is sampled from here; it is killed when
    it passes ``limit`` or the machine's MemAvailable falls below ``min_available``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid, interval=interval, limit=limit, on_limit=proc.kill,
                      min_available=min_available)
    sampler.start()
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        timed_out = True
    sampler.stop()
    return ChildRun(proc, out, err, sampler, timed_out, time.monotonic() - t0, timeout)


def child_row(run: ChildRun) -> dict[str, Any]:
    """The result row of a benchmark child: its RESULT plus the parent's view, or the error."""
    if run.result is None:
        return {"error": run.why, "stderr_tail": run.err[-3000:], "wall_s": run.wall,
                "parent_peak_rss_anon": run.sampler.peak()[0]}
    row = dict(run.result)
    row["parent_peak_rss_anon"] = run.sampler.peak()[0]
    row["wall_s"] = run.wall
    row["stderr_tail"] = run.err[-1500:]
    return row


def error_record(e: BaseException, t0: float | None = None) -> dict[str, Any]:
    """What a benchmark records instead of raising: the error and its traceback's tail."""
    import traceback
    rec: dict[str, Any] = {"error": f"{type(e).__name__}: {e}"[:2000],
                           "traceback_tail": traceback.format_exc()[-3000:]}
    if t0 is not None:
        rec["failed_after_s"] = time.monotonic() - t0
    return rec


def memory_record(sampler: Sampler) -> dict[str, int]:
    """Peak RssAnon (sampled, and now) and ru_maxrss of this process, in bytes."""
    import resource
    return {"peak_rss_anon": max(sampler.peak()[0], proc_status()["RssAnon"]),
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
