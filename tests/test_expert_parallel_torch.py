"""Expert parallelism on torch.distributed: 2 gloo processes on 127.0.0.1 against one process.

The test launches this file as two worker processes (``python this.py worker RANK ...``); each
initialises a gloo process group, loads the oracle configs' checkpoints once on one device and
once expert-parallel, runs both on the same inputs and interventions, and writes what it found
as JSON: per scenario the worst relative error over the logits and every hook, whether the
routing is identical, and a digest of its Output (every rank must return the same one).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_ep import compare_runs

HERE = Path(__file__).resolve()
TIMEOUT_S = 240  # the whole two-process run (bounded; a hung collective fails the test)
CASES = ("scout", "maverick")


def _checkpoints(root: Path) -> dict[str, Path]:
    from helpers_ckpt import save_random
    from oracle import CASES as ORACLE

    from workbench.config import ModelConfig
    out = {}
    for name in CASES:
        cfg = ModelConfig.tiny(**ORACLE[name])
        out[name] = save_random(root / name, cfg, seed=3, std=0.08, router_std=0.5)[0]
    out["odd"] = save_random(root / "odd", ModelConfig.tiny(num_local_experts=3), seed=3)[0]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("ep_torch")
    ckpts = _checkpoints(root)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), str(HERE.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(HERE), "worker", str(r), "2", str(port),
                               json.dumps({k: str(v) for k, v in ckpts.items()}),
                               str(root / f"rank{r}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


def test_every_hook_and_logits_match_one_device(results: list[dict]) -> None:
    for res in results:
        for case in CASES:
            for scenario, r in res[case].items():
                assert r["hooks"] > 20, (case, scenario, r)
                assert r["worst_rel"] <= 1e-6, (case, scenario, r)


def test_routing_identical_under_interventions(results: list[dict]) -> None:
    for res in results:
        for case in CASES:
            assert set(res[case]) >= {"plain", "ban", "force", "top2", "one_expert",
                                      "streamed"}
            for scenario, r in res[case].items():
                assert r["routing_equal"], (case, scenario)
            # the scenarios really changed the routing they claim to
            assert res[case]["ban"]["banned_used"] == 0
            assert res[case]["one_expert"]["distinct_experts"] == 1
            assert res[case]["top2"]["k"] == 2


def test_every_rank_returns_the_same_output(results: list[dict]) -> None:
    for case in CASES:
        for scenario in results[0][case]:
            assert results[0][case][scenario]["digest"] == results[1][case][scenario]["digest"]


def test_each_rank_holds_and_reads_only_its_experts(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        for case in CASES:
            info = res["info"][case]
            per = info["experts"] // 2
            assert info["expert_rows"] == per  # resident: a (E/2, ...) stack per layer
            assert info["lo"] == rank * per
            # streamed: every expert was routed to, but this rank read only its own
            assert info["streamed_expert_bytes"] == info["moe_layers"] * per * \
                info["bytes_per_expert"]
            assert info["tokens_exchanged"] > 0


def test_refusals(results: list[dict]) -> None:
    for res in results:
        assert "3 experts cannot be split evenly" in res["odd_error"]
        assert "2 ranks" in res["odd_error"]


def test_needs_a_process_group(tmp_path: Path) -> None:
    from helpers_ckpt import save_random

    import workbench as wb
    from workbench.config import ModelConfig
    path = save_random(tmp_path / "m", ModelConfig.tiny(), seed=0)[0]
    with pytest.raises(ValueError, match="init_process_group"):
        wb.load(path, backend="torch", expert_parallel=True)
    with pytest.raises(ValueError, match="mesh= is a jax.sharding.Mesh"):
        wb.load(path, backend="torch", mesh=object())


# ----------------------------------------------------------------------------- the worker
def _digest(out) -> str:
    h = hashlib.sha256(np.ascontiguousarray(out.logits).tobytes())
    for n in sorted(out.trace):
        h.update(n.encode())
        h.update(np.ascontiguousarray(out.trace[n]).tobytes())
    return h.hexdigest()


def _compare(ref, ep, ids: np.ndarray, interventions: list) -> dict:
    summary, a, b, idx = compare_runs(ref, ep, ids, interventions)
    chosen = np.concatenate([a.trace[n].ravel() for n in idx])
    return {**summary, "distinct_experts": int(len(np.unique(chosen))),
            "k": int(a.trace[idx[0]].shape[-1]), "digest": _digest(b), "chosen": chosen}


def _case(path: str) -> tuple[dict, dict]:
    import workbench as wb
    ref = wb.load(path, backend="torch")
    ep = wb.load(path, backend="torch", expert_parallel=True)
    cfg = ref.config
    moe = list(cfg.moe_layers)
    E = cfg.num_local_experts
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 23))
    out = {"plain": _compare(ref, ep, ids, [])}
    # ban the expert the plain run used most in the first MoE layer
    first = np.bincount(out["plain"]["chosen"], minlength=E)
    ban = int(first.argmax())
    out["ban"] = _compare(ref, ep, ids, [wb.ban_expert(layer=moe[0], expert=ban)])
    out["ban"]["banned_used"] = int((out["ban"]["chosen"][:ids.size] == ban).sum())
    out["force"] = _compare(ref, ep, ids, [wb.force_expert(layer=moe[-1], expert=1,
                                                           positions=[0, 3, 4])])
    out["top2"] = _compare(ref, ep, ids, [wb.set_top_k(2)])
    # load imbalance: every token of every MoE layer on one expert (held by the last rank)
    out["one_expert"] = _compare(ref, ep, ids, [wb.force_expert(layer=i, expert=E - 1)
                                                for i in moe])
    streamed = wb.load(path, backend="torch", expert_parallel=True, offload="disk")
    out["streamed"] = _compare(ref, streamed, ids, [wb.set_top_k(E)])  # every expert routed
    for r in out.values():
        del r["chosen"]
    gate_up = ep.params.as_dict()[f"layers.{moe[0]}.feed_forward.experts.gate_up_proj"]
    total = streamed.io_stats()["total"]
    info = {
        "experts": E, "moe_layers": len(moe), "expert_rows": int(gate_up.shape[0]),
        "lo": ep.shard.lo, "streamed_expert_bytes": total["expert_bytes"],
        "bytes_per_expert": gate_up[0].numel() * 3 // 2 * 4,  # float32 gate_up + down
        "tokens_exchanged": ep.ops.stats.row_bytes}
    # every rank saves the same checkpoint-layout experts (a collective)
    full = ep.state_dict_numpy()
    assert all(np.array_equal(full[n], v) for n, v in ref.state_dict_numpy().items())
    return out, info


def worker(rank: int, world: int, port: int, ckpts: dict[str, str], out: str) -> None:
    import torch.distributed as dist

    import workbench as wb
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        res: dict = {"info": {}}
        for name in CASES:
            res[name], res["info"][name] = _case(ckpts[name])
        try:
            wb.load(ckpts["odd"], backend="torch", expert_parallel=True)
            res["odd_error"] = "no error"
        except ValueError as e:
            res["odd_error"] = str(e)
        Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]),
           sys.argv[6])
