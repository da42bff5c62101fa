"""``workbench train``: train a Llama-4-architecture MoE on the bundled multi-domain corpus.

AdamW, linear warm-up then cosine decay, Switch load-balancing loss and router z-loss, gradient
clipping, a fixed seed, periodic validation, and checkpoints in the HF Llama 4 layout (with
config.json and tokenizer.json) plus a JSON training log whose per-layer expert load and router
entropy let one plot routing *during* training. Uses the torch backend's own forward pass, so
the trained model is exactly the model every other part of the workbench runs.

Nothing the user has is destroyed: every argument is checked before the disk is touched; ``--out``
is required and a non-empty directory is refused without ``--overwrite``; the run writes into a
temporary directory beside ``--out`` and moves its files into place only when it has finished,
so a failed or interrupted run leaves the old files as they were.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO / "data" / "corpus"
DEFAULT_TOKENIZER = REPO / "data" / "tokenizer" / "tokenizer.json"
BUNDLED_MODEL = REPO / "data" / "scout-mini"
BUNDLED_VISION_MODEL = REPO / "data" / "scout-mini-vision"  # train --multimodal


class TrainError(ValueError):
    """A training run that cannot start (bad arguments, missing corpus or tokenizer, or an
    output directory that would be overwritten); raised before anything is written."""


def shipped_config(vocab_size: int = 4096) -> ModelConfig:
    """The bundled model: Scout-shaped (all MoE, QK-norm, llama3 RoPE), small.

    4 layers (layer 3 is NoPE, global, temperature-tuned), 8 experts top-1 + shared expert,
    chunked attention of 64 tokens inside a 256-token training context, floor_scale 64 so the
    query temperature really changes within the context.
    """
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=256,
        intermediate_size_mlp=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=1,
        interleave_moe_layer_step=1, use_qk_norm=True, attention_chunk_size=64,
        attn_temperature_tuning=True, floor_scale=64, attn_scale=0.1,
        max_position_embeddings=4096, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.02,
    )


@dataclass
class TrainArgs:
    out: Path | None = None  # required by train(); never defaults to the bundled model
    corpus: Path = DEFAULT_CORPUS
    tokenizer: Path = DEFAULT_TOKENIZER
    steps: int = 800
    batch: int = 16
    context: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    clip: float = 1.0
    aux_coef: float = 0.01
    z_coef: float = 0.001
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    snapshots: tuple[int, ...] = ()
    dtype: str = "bfloat16"
    threads: int | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainArgs()
    p.add_argument("--out", type=Path, default=None,
                   help="output checkpoint directory (required; to reproduce the bundled model: "
                        "--out data/scout-mini --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoint, tokenizer, training log and checkpoints/ in a "
                        "non-empty --out (other files there are kept)")
    p.add_argument("--corpus", type=Path, default=d.corpus)
    p.add_argument("--tokenizer", type=Path, default=d.tokenizer)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--context", type=int, default=d.context)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip)
    p.add_argument("--aux-coef", type=float, default=d.aux_coef,
                   help="Switch load-balancing loss coefficient")
    p.add_argument("--z-coef", type=float, default=d.z_coef, help="router z-loss coefficient")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--snapshots", default="",
                   help="comma-separated steps at which to keep intermediate checkpoints")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"],
                   help="dtype of the saved weights")
    p.add_argument("--quick", action="store_true",
                   help="about a minute: a smaller model shape and 30 steps (for tests)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's setting; with --multimodal: "
                        "1, faster for its small products, above all on a busy machine)")
    p.add_argument("--multimodal", action="store_true",
                   help="train a small vision tower on the bundled text model with generated "
                        "captioned images (workbench.vision.train); uses --out, --steps, "
                        "--batch, --seed, --dtype")


def load_corpus(corpus: Path, split: str) -> list[dict[str, str]]:
    f = corpus / f"{split}.jsonl"
    if not f.is_file():
        raise FileNotFoundError(f"corpus split {f} not found (run scripts/build_corpus.py)")
    docs = []
    for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainError(f"{f}:{i}: not a JSON line ({e})") from None
        if not (isinstance(d, dict) and isinstance(d.get("text"), str)
                and isinstance(d.get("domain"), str)):
            raise TrainError(f"{f}:{i}: expected an object with string 'text' and 'domain'")
        docs.append(d)
    return docs


def check_args(a: TrainArgs, overwrite: bool = False) -> None:
    """Raise TrainError naming the argument unless the run can start; writes nothing."""
    if a.out is None:
        raise TrainError("--out is required (to reproduce the bundled model: workbench train "
                         f"--out {_rel(BUNDLED_MODEL)} --overwrite)")
    for split in ("train", "val"):
        f = Path(a.corpus) / f"{split}.jsonl"
        if not f.is_file():
            raise TrainError(f"--corpus {a.corpus}: no {split}.jsonl there (run "
                             "scripts/build_corpus.py)")
    tok = Path(a.tokenizer)
    if not (tok.is_file() or (tok / "tokenizer.json").is_file()):
        raise TrainError(f"--tokenizer {tok}: no tokenizer.json there")
    ints = {"steps": (a.steps, 1), "batch": (a.batch, 1), "context": (a.context, 2),
            "warmup": (a.warmup, 0), "eval_every": (a.eval_every, 1),
            "eval_batches": (a.eval_batches, 1), "seed": (a.seed, 0)}
    for name, (v, low) in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise TrainError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
    reals = {"lr": (a.lr, True), "clip": (a.clip, True), "weight_decay": (a.weight_decay, False),
             "aux_coef": (a.aux_coef, False), "z_coef": (a.z_coef, False),
             "min_lr_ratio": (a.min_lr_ratio, False)}
    for name, (v, positive) in reals.items():
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) \
                or v < 0 or (positive and v == 0):
            raise TrainError(f"--{name.replace('_', '-')} must be a finite number "
                             f"{'> 0' if positive else '>= 0'}, got {v!r}")
    if a.min_lr_ratio > 1:
        raise TrainError(f"min_lr_ratio must be <= 1, got {a.min_lr_ratio}")
    bad = [s for s in a.snapshots if not 1 <= s <= a.steps]
    if bad:
        raise TrainError(f"--snapshots {bad} outside 1..{a.steps} (--steps)")
    if a.dtype not in ("float32", "bfloat16"):
        raise TrainError(f"--dtype must be float32 or bfloat16, got {a.dtype!r}")
    if a.threads is not None and (not isinstance(a.threads, int) or a.threads < 1):
        raise TrainError(f"threads must be a positive integer, got {a.threads!r}")
    out = Path(a.out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise TrainError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise TrainError(f"--out {out} is not empty; pass --overwrite to replace its "
                             "checkpoint, tokenizer, training_log.json and checkpoints/ (other "
                             "files are kept)")


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


class TokenStream:
    """Documents tokenised (bos ... eos) and concatenated, sampled in fixed-length windows."""

    def __init__(self, docs: list[dict[str, str]], tok: Any, seed: int):
        ids, dom = [], []
        self.domains = sorted({d["domain"] for d in docs})
        for d in docs:
            t = tok.encode(d["text"], add_bos=True) + [tok.eos_id]
            ids.extend(t)
            dom.extend([self.domains.index(d["domain"])] * len(t))
        self.ids = np.asarray(ids, np.int64)
        self.domain = np.asarray(dom, np.int8)
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int, length: int) -> np.ndarray:
        starts = self.rng.integers(0, len(self.ids) - length - 1, n)
        return np.stack([self.ids[s:s + length + 1] for s in starts])

    def fixed(self, n: int, length: int, seed: int = 1234) -> np.ndarray:
        r = np.random.default_rng(seed)
        starts = r.integers(0, len(self.ids) - length - 1, n)
        return np.stack([self.ids[s:s + length + 1] for s in starts])


def lr_at(step: int, a: TrainArgs) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def router_losses(logits: Any, idx: Any, E: int) -> tuple[Any, Any, np.ndarray, float]:
    """Switch aux loss E * sum_e f_e * P_e (P from softmax over logits), z-loss, load, entropy.

    f_e: fraction of assignments to e (counted over the top-k choices); P_e: mean softmax
    probability of e. The router itself is sigmoid (Llama 4); softmax here only shapes the
    balancing gradient, as in Switch/ST-MoE. Entropy: mean per-token entropy of the
    sigmoid-normalised scores (sigmoid(l) / sum sigmoid(l)).
    """
    import torch
    lf = logits.reshape(-1, E).float()
    probs = torch.softmax(lf, dim=-1)
    counts = torch.bincount(idx.reshape(-1), minlength=E).float()
    f = counts / counts.sum()
    aux = E * (f * probs.mean(0)).sum()
    z = torch.logsumexp(lf, dim=-1).pow(2).mean()
    with torch.no_grad():
        s = torch.sigmoid(lf)
        q = s / s.sum(-1, keepdim=True)
        ent = float(-(q * torch.log(q.clamp_min(1e-12))).sum(-1).mean())
    return aux, z, f.detach().numpy(), ent


def train(a: TrainArgs, cfg: ModelConfig | None = None, progress: bool = True,
          overwrite: bool = False) -> dict:
    """Train and write the checkpoint(s) into ``a.out``; returns the training log.

    Checks everything first (:func:`check_args`, tokenizer, corpus, config) and raises
    TrainError before writing anything. The run is written into a temporary directory beside
    ``a.out`` and moved into place when complete (see :func:`install_run`).
    """
    check_args(a, overwrite)
    from .tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_pretrained(a.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(f"--tokenizer: {e}") from None
    cfg = cfg or shipped_config(tok.vocab_size)
    if cfg.vocab_size < tok.vocab_size:
        raise TrainError(f"config vocab_size={cfg.vocab_size} < tokenizer vocab "
                         f"{tok.vocab_size}")
    if a.context > cfg.max_position_embeddings:
        raise TrainError(f"--context {a.context} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    train_stream = TokenStream(load_corpus(a.corpus, "train"), tok, a.seed)
    val_stream = TokenStream(load_corpus(a.corpus, "val"), tok, a.seed + 1)
    for split, stream in (("train", train_stream), ("val", val_stream)):
        if len(stream.ids) < a.context + 2:
            raise TrainError(f"--corpus {a.corpus}: the {split} split has {len(stream.ids)} "
                             f"tokens, fewer than --context {a.context} + 2")
    val_batches = val_stream.fixed(a.eval_batches * a.batch, a.context)

    out = Path(a.out)
    return run_staged(out, overwrite,
                      lambda stage: _train(a, cfg, tok, train_stream, val_batches, stage,
                                           progress))


def run_staged(out: Path, overwrite: bool, run: Callable[[Path], Any]) -> Any:
    """``run(stage)`` in a fresh staging folder beside ``out``, then the stage installed as
    ``out``; a failed run leaves nothing behind (unless it kept its folder on purpose)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.training-", dir=out.parent))
    try:
        result = run(stage)
        install_run(stage, out, overwrite)
    except _RunKept:
        raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return result


class _RunKept(TrainError):
    """The run finished but could not be moved into place; it stays where the message says."""


def _train(a: TrainArgs, cfg: ModelConfig, tok: Any, train_stream: TokenStream,
           val_batches: np.ndarray, stage: Path, progress: bool) -> dict:
    """The training loop; every file goes into ``stage``."""
    import torch

    from .analysis.training import new_training_log, training_log_entry
    from .interventions import Plan
    from .random_weights import random_tensors
    from .torch.model import TorchModel

    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)

    model = TorchModel(cfg, random_tensors(cfg, a.seed), "float32")
    params = model.params.as_dict()
    for t in params.values():
        t.requires_grad_(True)
    decay = [t for n, t in params.items() if t.ndim >= 2 and "embed" not in n]
    no_decay = [t for n, t in params.items() if not (t.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    capture = [f"layers.{i}.moe.{h}" for i in cfg.moe_layers
               for h in ("router_logits", "topk_indices")]
    E = cfg.num_local_experts
    unigram = unigram_loss(train_stream.ids, val_batches[:, 1:], cfg.vocab_size)
    log = new_training_log({
        "config": cfg.to_text_dict(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in a.__dict__.items()},
        "unigram_val_loss": unigram, "domains": train_stream.domains,
        "train_tokens_available": int(len(train_stream.ids)),
    })
    bar = _progress(a.steps, progress)
    t0 = time.time()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        batch = torch.from_numpy(train_stream.batch(a.batch, a.context))
        logits, cap = model.forward_train(batch[:, :-1], Plan(), capture)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                               batch[:, 1:].reshape(-1))
        aux_total = torch.zeros(())
        z_total = torch.zeros(())
        loads, ents = {}, {}
        for i in cfg.moe_layers:
            aux, z, load, ent = router_losses(cap[f"layers.{i}.moe.router_logits"],
                                              cap[f"layers.{i}.moe.topk_indices"].long(), E)
            aux_total = aux_total + aux
            z_total = z_total + z
            loads[str(i)] = [float(x) for x in load]
            ents[str(i)] = round(ent, 5)
        n_moe = max(1, len(cfg.moe_layers))
        loss = ce + a.aux_coef * aux_total / n_moe + a.z_coef * z_total / n_moe
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ce_value = float(ce.detach())
        gnorm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), a.clip))
        opt.step()
        val = None
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            val = round(evaluate(model, val_batches, a.batch), 5)
        rec = training_log_entry(step + 1, round(ce_value, 5), loads, ents, val)
        rec.update({"aux_loss": round(float(aux_total.detach()) / n_moe, 5),
                    "z_loss": round(float(z_total.detach()) / n_moe, 5), "lr": lr_at(step, a),
                    "grad_norm": round(gnorm, 4), "tokens": (step + 1) * a.batch * a.context,
                    "elapsed_s": round(time.time() - t0, 1)})
        log["steps"].append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{ce_value:.3f}", val=val or "-")
        if step + 1 in a.snapshots and step + 1 != a.steps:
            save_model(model, stage / "checkpoints" / f"step-{step + 1:05d}", a, tok)
    bar.close()
    log["meta"]["final_val_loss"] = log["steps"][-1]["val_loss"]
    log["meta"]["elapsed_s"] = round(time.time() - t0, 1)
    save_model(model, stage, a, tok)
    (stage / "training_log.json").write_text(json.dumps(log) + "\n")
    return log


def install_run(stage: Path, out: Path, overwrite: bool) -> None:
    """Move a finished run from ``stage`` to ``out``.

    A missing or empty ``out`` is replaced by ``stage`` in one rename. Otherwise (only with
    ``overwrite``) each file is moved in by a rename, weights first, stale shards removed, and
    ``checkpoints/`` is swapped for the run's; other files in ``out`` are kept.
    """
    from .checkpoint import INDEX_FILE, install_checkpoint_files
    if not out.exists():
        os.rename(stage, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        os.replace(stage, out)
        return
    if not overwrite:
        raise _RunKept(f"--out {out} is no longer empty; the finished run is kept in {stage}")
    files = sorted(p.name for p in stage.iterdir() if p.is_file())
    weights = [f for f in files if f.endswith(".safetensors")]
    rest = [f for f in files if f not in weights and f != INDEX_FILE]
    install_checkpoint_files(stage, out, weights + [f for f in files if f == INDEX_FILE] + rest)
    new, old = stage / "checkpoints", out / "checkpoints"
    trash = None
    if old.exists() or old.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=".checkpoints.old-", dir=out))
        os.replace(old, trash / "checkpoints")
    if new.exists():
        os.replace(new, old)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)


def evaluate(model: Any, batches: np.ndarray, bs: int) -> float:
    """Mean next-token cross-entropy (nats) on fixed validation windows."""
    import torch
    tot, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(batches), bs):
            b = torch.from_numpy(batches[s:s + bs])
            logits, _ = model.forward_train(b[:, :-1])
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   b[:, 1:].reshape(-1), reduction="sum")
            tot += float(ce)
            n += b[:, 1:].numel()
    return tot / n


def unigram_loss(train_ids: np.ndarray, targets: np.ndarray, vocab: int) -> float:
    """Cross-entropy of the add-one-smoothed unigram distribution of the training stream."""
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[targets.reshape(-1)].mean())


def save_model(model: Any, out: Path, a: TrainArgs, tok: Any) -> Path:
    from .checkpoint import Checkpoint
    Checkpoint.save(out, model.state_dict_numpy(), model.config, dtype=a.dtype,
                    multimodal=False)
    tok.save(out)
    return out


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, disable=not enabled, desc="train", unit="step")
    except ImportError:  # tqdm is in the train extra; degrade to a silent counter
        class _Bar:
            def update(self, n): ...
            def set_postfix(self, **k): ...
            def set_description(self, d): ...
            def close(self): ...
        return _Bar()


def main(ns: argparse.Namespace) -> int:
    try:
        return _main(ns)
    except (TrainError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(ns: argparse.Namespace) -> int:
    if getattr(ns, "multimodal", False):
        return _main_multimodal(ns)
    try:
        snapshots = tuple(int(s) for s in ns.snapshots.split(",") if s.strip())
    except ValueError:
        raise TrainError(f"--snapshots must be comma-separated step numbers, got "
                         f"{ns.snapshots!r}") from None
    a = TrainArgs(out=ns.out, corpus=ns.corpus, tokenizer=ns.tokenizer, steps=ns.steps,
                  batch=ns.batch, context=ns.context, lr=ns.lr, warmup=ns.warmup,
                  weight_decay=ns.weight_decay, clip=ns.clip, aux_coef=ns.aux_coef,
                  z_coef=ns.z_coef, seed=ns.seed, eval_every=ns.eval_every,
                  snapshots=snapshots, dtype=ns.dtype, threads=ns.threads)
    overwrite = bool(getattr(ns, "overwrite", False))
    cfg = None
    if ns.quick:
        a.steps, a.batch, a.context, a.warmup, a.eval_every = 30, 8, 128, 5, 10
        a.eval_batches = 2
    check_args(a, overwrite)
    if ns.quick:
        from .tokenizer import Tokenizer
        try:
            vocab = Tokenizer.from_pretrained(a.tokenizer).vocab_size
        except ValueError as e:
            raise TrainError(f"--tokenizer: {e}") from None
        cfg = shipped_config(vocab).replace(hidden_size=64, intermediate_size=64,
                                            num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=32, attention_chunk_size=32)
    log = train(a, cfg, overwrite=overwrite)
    m = log["meta"]
    print(f"done: val loss {m['final_val_loss']:.4f} (unigram {m['unigram_val_loss']:.4f})"
          f" in {m['elapsed_s']:.0f} s -> {a.out}")
    return 0


def _main_multimodal(ns: argparse.Namespace) -> int:
    """``--multimodal``: checks the arguments it uses, trains into a staging directory beside
    ``--out`` and moves the run into place when it has finished (as ``train``)."""
    from dataclasses import replace

    from .vision.train import MultimodalArgs, train_multimodal
    if ns.out is None:
        raise TrainError("--out is required (e.g. --out data/scout-mini-vision)")
    for name in ("steps", "batch", "threads"):
        v = getattr(ns, name)
        if v is not None and v < 1:
            raise TrainError(f"--{name} must be an integer >= 1, got {v}")
    if ns.seed < 0:
        raise TrainError(f"--seed must be an integer >= 0, got {ns.seed}")
    out = Path(ns.out)
    overwrite = bool(getattr(ns, "overwrite", False))
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a directory")
    if out.resolve() == BUNDLED_MODEL.resolve():
        raise TrainError(f"--out {out} is the bundled text model the multimodal run starts "
                         "from and cannot be its output, even with --overwrite; choose "
                         "another directory (e.g. data/scout-mini-vision)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TrainError(f"--out {out} is not empty; pass --overwrite to replace it")
    a = MultimodalArgs(out=out, base=BUNDLED_MODEL, steps=ns.steps, batch=ns.batch,
                       seed=ns.seed, dtype=ns.dtype,
                       threads=1 if ns.threads is None else ns.threads)
    if ns.quick:
        a = replace(a, steps=20, batch=4, train_images=64, eval_images=8)
    res = run_staged(out, overwrite, lambda stage: train_multimodal(replace(a, out=stage)))
    print(f"done: caption loss {res['multimodal']['caption_loss_with_image']:.4f} with the "
          f"image, {res['text_only_baseline']['caption_loss']:.4f} text-only "
          f"(untrained {res['untrained']['caption_loss_with_image']:.4f}) in "
          f"{res['elapsed_s']:.0f} s -> {out}")
    return 0


def routing_structure(model: Any, tok: Any, corpus: Path = DEFAULT_CORPUS, docs_per_domain: int = 8,
                      length: int = 128, seed: int = 0) -> dict[str, Any]:
    """How much a model's routing is structured, on held-out text (the model card's numbers).

    For every MoE layer: normalised mutual information between each token's top-1 expert and
    (a) its document's domain, (b) its token category (workbench.tokenizer.token_category),
    (c) its top-1 expert in the next MoE layer (consistent expert paths); their means over
    layers in ``summary``; plus validation loss. Deterministic for a given model and seed.
    """
    from .analysis import layer_nmi, routing_table
    from .analysis import normalised_mutual_information as nmi
    docs = load_corpus(corpus, "val")
    rng = np.random.default_rng(seed)
    by_dom: dict[str, list[str]] = {}
    for d in docs:
        by_dom.setdefault(d["domain"], []).append(d["text"])
    traces, domains, cats, losses = [], [], [], []
    for dom in sorted(by_dom):
        texts = by_dom[dom]
        pick = rng.choice(len(texts), size=min(docs_per_domain, len(texts)), replace=False)
        for j in sorted(pick):
            ids = tok.encode(texts[j])[: length + 1]
            out = model.run(np.array([ids[:-1]]), capture="*.moe.topk_indices")
            lg = out.logits[0].astype(np.float64)
            lg -= lg.max(-1, keepdims=True)
            lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
            losses.extend(-lp[np.arange(len(ids) - 1), ids[1:]])
            traces.append(out.trace)
            domains.extend([dom] * (len(ids) - 1))
            cats.extend(tok.categories(ids[:-1]))
    result: dict[str, Any] = {"tokens": len(domains), "val_loss": float(np.mean(losses)),
                              "layers": {}}
    for layer in model.config.moe_layers:
        top1 = np.concatenate([t[f"layers.{layer}.moe.topk_indices"][0, :, 0] for t in traces])
        result["layers"][str(layer)] = {"nmi_domain": nmi(top1, np.array(domains)),
                                        "nmi_category": nmi(top1, np.array(cats))}
    layers = model.config.moe_layers
    for a, b in zip(layers, layers[1:]):
        result["layers"][str(a)]["nmi_next_layer"] = layer_nmi(traces, a, b)
    result["summary"] = {
        key: float(np.mean([v[key] for v in result["layers"].values() if key in v]))
        for key in ("nmi_domain", "nmi_category", "nmi_next_layer")}
    result["routing_table"] = routing_table(traces)
    return result
