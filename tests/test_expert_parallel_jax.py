"""Expert parallelism on a jax mesh: 4 virtual CPU devices against one device.

jax fixes its device count when it starts, so the comparison runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (this file, ``python this.py worker``).
It loads the oracle configs' checkpoints once on one device and once expert-parallel (one
"expert" axis of 4, and a ("data", "expert") mesh of 2 x 2), runs both on the same inputs and
interventions, and writes as JSON per scenario the worst relative error over the logits and
every hook and whether the routing is identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_ep import compare_runs

HERE = Path(__file__).resolve()
TIMEOUT_S = 300
CASES = ("scout", "maverick")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from helpers_ckpt import save_random
    from oracle import CASES as ORACLE

    from workbench.config import ModelConfig
    root = tmp_path_factory.mktemp("ep_jax")
    ckpts = {name: str(save_random(root / name, ModelConfig.tiny(**ORACLE[name]), seed=3,
                                   std=0.08, router_std=0.5)[0]) for name in CASES}
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), str(HERE.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    # one worker per config, side by side (compiling dominates and is mostly single-threaded)
    procs = {name: subprocess.Popen([sys.executable, str(HERE), "worker", name, ckpts[name],
                                     str(root / f"{name}.json")], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name in CASES}
    logs = {}
    try:
        for name, p in procs.items():
            logs[name] = p.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    res: dict = {"info": {}}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} worker failed:\n{logs[name][-4000:]}"
        got = json.loads((root / f"{name}.json").read_text())
        res[name], res["info"][name] = got["result"], got["info"]
        res.update(got.get("extra", {}))
    return res


def test_every_hook_and_logits_match_one_device(results: dict) -> None:
    for case in CASES:
        assert set(results[case]) >= {"plain", "interventions"}
        assert results[case]["plain"]["hooks"] > 40
        for scenario, r in results[case].items():
            assert r["hooks"] > 8, (case, scenario, r)
            # fp32 rounding only (sharded sums in another order): 4e-7 to 1.1e-6 seen,
            # depending on the CPU's vector width (XLA's AVX2 or AVX-512 code)
            assert r["worst_rel"] <= 5e-6, (case, scenario, r)
    # a ("data", "expert") mesh: the batch split over "data", experts over "expert"
    assert "data_mesh" in results["scout"]


def test_routing_identical_under_interventions(results: dict) -> None:
    for case in CASES:
        for scenario, r in results[case].items():
            assert r["routing_equal"], (case, scenario)
        info = results["info"][case]
        assert info["banned_used"] == 0 and info["top2_k"] == 2 and info["forced_ok"]
        assert info["one_expert"]


def test_experts_sharded_one_share_per_device(results: dict) -> None:
    for case in CASES:
        info = results["info"][case]
        per_device = info["expert_bytes_per_device"]
        assert len(per_device) == 4
        assert set(per_device.values()) == {info["total_expert_bytes"] // 4}
        assert info["state_dict_equal"]


def test_refusals(results: dict) -> None:
    err = results["errors"]
    assert "8 experts cannot be split evenly over 3 devices" in err["three"]
    assert "needs an axis named 'expert'" in err["no_expert_axis"]
    assert "only 'expert' and 'data'" in err["other_axis"]
    assert "offload='disk'" in err["offload"]
    assert "jax.sharding.Mesh" in err["not_a_mesh"]
    assert "batch of 3 sequences cannot be split over the mesh's 'data' axis of 2" in \
        err["odd_batch"]


# ----------------------------------------------------------------------------- the worker
def _compare(ref, ep, ids: np.ndarray, interventions: list, capture: object = "*") -> dict:
    summary, a, _, _ = compare_runs(ref, ep, ids, interventions, capture)
    return {**summary, "trace": a.trace}


def _case(path: str, data_mesh: bool) -> tuple[dict, dict]:
    import jax
    from jax.sharding import Mesh

    import workbench as wb
    from workbench.jax.parallel import expert_bytes_per_device
    ref = wb.load(path, backend="jax", device=jax.devices()[0])
    ep = wb.load(path, backend="jax", expert_parallel=True)
    for m in (ref, ep):  # compiling dominates at this size
        m.compiler_options = {"xla_backend_optimization_level": 0}
    cfg = ref.config
    moe = cfg.moe_layers
    E = cfg.num_local_experts
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 23))
    out = {"plain": _compare(ref, ep, ids, [])}
    # every MoE layer but the last: its most used expert banned, expert 1 forced at three
    # positions, top-2; the last: every token on the last device's last expert (imbalance)
    first = out["plain"]["trace"][f"layers.{moe[0]}.moe.topk_indices"]
    ban = int(np.bincount(first.ravel(), minlength=E).argmax())
    ban = ban if ban != 1 else 0
    ivs = [wb.set_top_k(2, layer=i) for i in moe[:-1]]
    ivs += [wb.ban_expert(layer=i, expert=ban) for i in moe[:-1]]
    ivs += [wb.force_expert(layer=i, expert=1, positions=[0, 3, 4]) for i in moe[:-1]]
    ivs += [wb.force_expert(layer=moe[-1], expert=E - 1)]
    out["interventions"] = _compare(ref, ep, ids, ivs, ["*.moe.*", "layers.*.resid_post",
                                                        "logits"])
    t = out["interventions"]["trace"]
    early = np.stack([t[f"layers.{i}.moe.topk_indices"] for i in moe[:-1]])
    checks = {"banned_used": int((early == ban).sum()), "top2_k": int(early.shape[-1]),
              "forced_ok": bool((early[:, :, [0, 3, 4]] == 1).any(-1).all()),
              "one_expert": np.unique(t[f"layers.{moe[-1]}.moe.topk_indices"]).tolist()
              == [E - 1]}
    if data_mesh:
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "expert"))
        dm = wb.load(path, backend="jax", mesh=mesh)
        dm.compiler_options = ep.compiler_options
        out["data_mesh"] = _compare(ref, dm, ids, [])
    for r in out.values():
        del r["trace"]
    total = sum(int(np.prod(ref.params[n].shape)) * 4 for n in ref.params
                if ".experts." in n)
    sd_ref, sd_ep = ref.state_dict_numpy(), ep.state_dict_numpy()
    info = {"expert_bytes_per_device": expert_bytes_per_device(ep.expert_slots),
            "total_expert_bytes": total, **checks,
            "state_dict_equal": sd_ref.keys() == sd_ep.keys()
            and all(np.array_equal(sd_ref[n], sd_ep[n]) for n in sd_ref)}
    return out, info


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def worker(name: str, path: str, out: str) -> None:
    import jax
    from jax.sharding import Mesh

    import workbench as wb
    assert len(jax.devices()) == 4, jax.devices()
    result, info = _case(path, data_mesh=name == "scout")
    extra = {}
    if name == "scout":
        devs = np.array(jax.devices())
        extra["errors"] = {
            "three": _error(lambda: wb.load(path, backend="jax",
                                            mesh=Mesh(devs[:3], ("expert",)))),
            "no_expert_axis": _error(lambda: wb.load(path, backend="jax",
                                                     mesh=Mesh(devs, ("data",)))),
            "other_axis": _error(lambda: wb.load(path, backend="jax", mesh=Mesh(
                devs.reshape(2, 2), ("model", "expert")))),
            "offload": _error(lambda: wb.load(path, backend="jax", expert_parallel=True,
                                              offload="disk")),
            "not_a_mesh": _error(lambda: wb.load(path, backend="jax", mesh="expert")),
            "odd_batch": _error(lambda: wb.load(path, backend="jax", mesh=Mesh(
                devs.reshape(2, 2), ("data", "expert"))).run(np.zeros((3, 4), np.int64))),
        }
    Path(out).write_text(json.dumps({"result": result, "info": info, "extra": extra}))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(sys.argv[2], sys.argv[3], sys.argv[4])
