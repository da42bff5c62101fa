"""Streamed weights: run checkpoints larger than memory, reading each layer just before use.

``StreamedWeights`` is a weight source for ``workbench.forward``. Per layer it copies the dense
weights (attention, norms, router, shared expert or dense MLP) from the memory-mapped shards to
the model's device just before the layer runs, prefetching the next layer in a background
thread while the current one computes, and drops them after. Routed experts are read sparsely:
the router runs first, then only the experts it chose are read, once per forward whatever the
number of tokens sent to them, through an LRU cache bounded by ``max_memory`` bytes (decode
steps hit it). The embedding reads only the rows of the tokens asked for.

``io_stats()`` reports, per layer and in total, the bytes read from the checkpoint, expert
cache hits and misses, and the seconds the forward waited on reads.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import hooks as hk
from .checkpoint import Checkpoint, ExpertWeights, expected_shapes
from .config import ModelConfig

Array = Any
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: str | int | None, what: str = "max_memory") -> int | None:
    """A byte budget: an int, or a string such as ``"6GB"``, ``"512 MiB"``; None stays None.
    ``what`` names the argument in errors."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what}={value!r}: give a byte count or a string like '6GB'")
    if isinstance(value, int | np.integer):
        if value < 0:
            raise ValueError(f"{what}={value!r} must be >= 0")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{what}={value!r}: give a byte count or a string like '6GB', "
                         f"'512MiB' (units: {', '.join(u for u in _UNITS if u)})")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class LayerIO:
    """What one layer (or the embedding / head) read."""

    bytes_read: int = 0
    expert_bytes: int = 0
    expert_hits: int = 0
    expert_misses: int = 0
    wait_s: float = 0.0


class IOStats:
    """Bytes read, expert cache hits/misses and I/O wait, per layer and in total."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.parts: dict[str, LayerIO] = {}

    def part(self, key: str) -> LayerIO:
        with self._lock:
            return self.parts.setdefault(key, LayerIO())

    def reset(self) -> None:
        with self._lock:
            self.parts.clear()

    def as_dict(self) -> dict[str, Any]:
        """{"total": {...}, "layers": {"embed": {...}, "0": {...}, ..., "head": {...}}}."""
        with self._lock:
            parts = {k: asdict(v) for k, v in self.parts.items()}
        total = {f: sum(p[f] for p in parts.values()) for f in asdict(LayerIO())}
        return {"total": total, "layers": parts}


class StreamedWeights:
    """A weight source that reads from the memory-mapped checkpoint as the forward advances.

    ``put(array)`` copies one host array (a view of the file) to the device in the model's
    dtype; ``put_expert(ExpertWeights)`` does the same for one routed expert (gate_up (D, 2I),
    down (I, D), FP8 kept FP8 with its scales), in the layout the backend's dispatch reads.
    FP8 dense weights are dequantised as they are read. ``act_quant`` (torch, w8a8): the
    function the dispatch applies to each expert matmul's input.
    """

    def __init__(self, ck: Checkpoint, put: Callable[[np.ndarray], Array],
                 put_expert: Callable[[ExpertWeights], Any],
                 max_memory: int | None = None, prefetch: bool = True,
                 act_quant: Callable[[Array], Array] | None = None):
        self.ck = ck
        self.act_quant = act_quant
        self.cfg: ModelConfig = ck.config
        self.put = put
        self.put_expert = put_expert
        self.stats = IOStats()
        self.max_memory = max_memory
        self.cache = ExpertCache(max_memory or 0, self.cfg.num_hidden_layers)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wb-prefetch") if prefetch \
            else None
        self._pending: dict[int, Future] = {}
        self._limit = self.cfg.num_hidden_layers
        shapes = expected_shapes(self.cfg)
        self._dense: list[list[str]] = [[] for _ in range(self.cfg.num_hidden_layers)]
        for n in shapes:
            i = hk.layer_of(n)
            if i is not None and ".experts." not in n and n in ck:
                self._dense[i].append(n)

    # ------------------------------------------------------------------ WeightSource
    def begin(self, layers: int) -> None:
        """A forward over layers 0..layers-1 starts: prefetch layer 0, never past the last."""
        self._limit = layers
        self._schedule(0)

    def embedding(self, ids: np.ndarray) -> tuple[Array, np.ndarray]:
        """Only the rows of the tokens in ``ids`` (sorted unique ids, padded to a power of two
        so compiled backends see few shapes) and ids renumbered into them."""
        uniq, local = np.unique(ids, return_inverse=True)
        n = 1 << (len(uniq) - 1).bit_length()
        rows = np.concatenate([uniq, np.full(n - len(uniq), uniq[0])])
        t = time.perf_counter()
        view = self.ck.view("embed_tokens.weight")
        table = self.put(view[rows])
        self.ck.evict("embed_tokens.weight")
        io = self.stats.part("embed")
        io.bytes_read += len(uniq) * view.shape[1] * view.dtype.itemsize
        io.wait_s += time.perf_counter() - t
        return table, local.reshape(ids.shape)

    def layer(self, i: int) -> dict[str, Array]:
        t = time.perf_counter()
        fut = self._pending.pop(i, None)
        lp = fut.result() if fut is not None else self._read_layer(i)
        self.stats.part(str(i)).wait_s += time.perf_counter() - t
        self._schedule(i + 1)
        if self.cfg.is_moe(i):
            lp["experts"] = ExpertSet(self, i)
        return lp

    def release(self, i: int) -> None:
        """Nothing is kept: layer i's weights go when the forward drops them."""

    def head(self) -> tuple[Array, Array]:
        t = time.perf_counter()
        name = "embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
        norm, head = self._read("norm.weight", "head"), self._read(name, "head")
        self.stats.part("head").wait_s += time.perf_counter() - t
        return norm, head

    # ------------------------------------------------------------------ reading
    def _schedule(self, i: int) -> None:
        if self._pool is None or i >= self._limit or i in self._pending:
            return
        self._pending[i] = self._pool.submit(self._read_layer, i)

    def _read(self, name: str, part: str) -> Array:
        view = self.ck.view(name)
        nbytes = view.nbytes
        if self.ck.is_quantized(name):  # a quantised dense weight: dequantised on the way
            view = self.ck.dequantized(name)
        arr = self.put(view)
        self.stats.part(part).bytes_read += nbytes
        del view
        self.ck.evict(name)
        return arr

    def _read_layer(self, i: int) -> dict[str, Array]:
        pre = hk.absolute(i, "")
        return {n[len(pre):]: self._read(n, str(i)) for n in self._dense[i]}

    def read_expert(self, layer: int, e: int) -> Any:
        """Expert e of ``layer`` on the device (through the cache)."""
        io = self.stats.part(str(layer))
        hit = self.cache.get((layer, e))
        if hit is not None:
            io.expert_hits += 1
            return hit
        t = time.perf_counter()
        stored = self.ck.expert(layer, e)
        nbytes = stored.nbytes
        w = self.put_expert(stored)
        del stored
        self.ck.evict_expert(layer, e)
        io.expert_misses += 1
        io.bytes_read += nbytes
        io.expert_bytes += nbytes
        io.wait_s += time.perf_counter() - t
        self.cache.put((layer, e), w, nbytes)
        return w

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pending.clear()


class ExpertSet:
    """Layer i's routed experts, read when the forward asks for them (after routing)."""

    def __init__(self, source: StreamedWeights, layer: int):
        self.source = source
        self.layer = layer
        self.num_experts = source.cfg.num_local_experts
        self.act_quant = source.act_quant

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (gate_up and down, FP8 scales included) as stored."""
        return self.source.ck.expert_nbytes(self.layer)

    def groups(self, ids: Iterable[int], max_bytes: int) -> list[list[int]]:
        """``ids`` in consecutive groups of at most ``max_bytes`` (at least one expert each),
        so a backend that holds a group's weights at once stays within a memory bound."""
        per = max(1, max_bytes // max(1, self.expert_bytes))
        ids = [int(e) for e in ids]
        return [ids[j:j + per] for j in range(0, len(ids), per)]

    def fetch(self, ids: Iterable[int]) -> dict[int, Any]:
        """{e: expert weights} for the given expert ids, each read at most once."""
        return {int(e): self.source.read_expert(self.layer, int(e)) for e in ids}


class ExpertCache:
    """Experts kept across forwards within a byte budget (0 keeps nothing).

    A forward visits the layers in a cycle, so plain LRU thrashes as soon as the budget is one
    expert short of a step's working set: it evicts each layer's expert just before that layer
    needs it again. When full, this cache takes the victim from the layer holding the most
    experts (counting the newcomer), so a prefill that reads every expert of a layer does not
    leave the cache to the first layers; among those, the expert whose layer comes back last in
    the cycle (Belady's choice for a cyclic scan), least recently used among equals. A newcomer
    that would itself be that victim is not admitted.
    """

    def __init__(self, budget: int, layers: int = 1):
        self.budget = budget
        self.layers = max(1, layers)
        self.used = 0
        self._items: OrderedDict[tuple[int, int], tuple[Any, int]] = OrderedDict()

    def get(self, key: tuple[int, int]) -> Any:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: tuple[int, int], value: Any, nbytes: int) -> None:
        if nbytes > self.budget:
            return
        now = key[0]  # the layer being read: its next use is a full cycle away
        while self.used + nbytes > self.budget:
            per_layer: dict[int, int] = {now: 1}
            for k in self._items:
                per_layer[k[0]] = per_layer.get(k[0], 0) + 1
            most = max(per_layer.values())
            age = {k: r for r, k in enumerate(self._items)}  # 0 = least recently used
            age[key] = len(age)  # the newcomer is the most recent
            cands = [k for k in (*self._items, key) if per_layer[k[0]] == most]
            victim = max(cands, key=lambda k: ((k[0] - now - 1) % self.layers, -age[k]))
            if victim == key:
                return
            self.used -= self._items.pop(victim)[1]
        self._items[key] = (value, nbytes)
        self.used += nbytes

    def __len__(self) -> int:
        return len(self._items)


def check_offload(offload: str | None, max_memory: int | str | None) -> str | None:
    """Validate ``offload=`` / ``max_memory=`` of ``wb.load``; returns the offload mode."""
    if offload not in (None, "disk"):
        raise ValueError(f"offload={offload!r}: use None (weights held in memory) or 'disk' "
                         "(stream layers and chosen experts from the checkpoint)")
    parse_bytes(max_memory)
    if max_memory is not None and offload is None:
        raise ValueError("max_memory= is the byte budget of the streamed expert cache; it needs "
                         "offload='disk'")
    return offload


def streamed_state_dict(source: StreamedWeights) -> dict[str, np.ndarray]:
    """Every weight of a streamed model as float32 numpy arrays, read from its checkpoint."""
    return {n: source.ck.dequantized(n) for n in source.ck.weight_names()}
