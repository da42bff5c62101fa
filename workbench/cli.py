"""``workbench`` command line: inspect | demo | parity | train | report | bench | quantize.

A user mistake (a bad argument, a checkpoint or trace that cannot be used, an unknown hook
name, an id out of range, ...) prints ``error: ...`` on stderr and exits with status 2, as
argparse does for malformed arguments; no traceback. ``--debug`` (or ``WORKBENCH_DEBUG=1``)
re-raises instead, with the traceback. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig
from .describe import inspect_text
from .hooks import HookError, resolve
from .interventions import InterventionError
from .jsonio import dumps
from .model import DTYPES, DeviceError, InputError
from .trace import TraceError

BACKENDS = ("torch", "jax")
PACKAGE_DIR = Path(__file__).resolve().parent


class UsageError(Exception):
    """A mistake in a command's arguments or inputs (exit status 2)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, InputError, HookError, InterventionError, CheckpointError, ConfigError,
    DeviceError, TraceError, OSError)
"""Errors that are the user's to fix: reported as ``error: ...``, exit status 2. A plain
ValueError counts too when a check of the workbench itself raised it (see ``_ours``)."""


# ----------------------------------------------------------------------------- argument types
def _int_at_least(lo: int):
    """An argparse type: an int >= ``lo``."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
        return n
    parse.__name__ = f"int >= {lo}"
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0 (no NaN, no inf)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return x


def token_ids(text: str) -> list[int]:
    """argparse type: token ids separated by spaces or commas, e.g. '1 5 9' or '1,5,9'."""
    parts = text.replace(",", " ").split()
    if not parts:
        raise argparse.ArgumentTypeError("no token ids given (e.g. --ids '1 5 9')")
    out = []
    for t in parts:
        try:
            out.append(int(t))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{t!r} is not a token id (an integer); pass "
                                             "ids like '1 5 9' or '1,5,9'") from None
        if out[-1] < 0:
            raise argparse.ArgumentTypeError(f"token id {out[-1]} is negative")
    return out


def _ids_from_args(args, tokenizer_dir: Path | None):
    import numpy as np
    if getattr(args, "ids", None):
        return np.array([args.ids])
    text = getattr(args, "text", None)
    if text is not None:
        from .tokenizer import Tokenizer
        if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").exists():
            raise UsageError(f"--text needs a tokenizer.json beside the checkpoint "
                             f"({tokenizer_dir}); pass --ids instead")
        return np.array([Tokenizer.from_pretrained(tokenizer_dir).encode(text)])
    return None


def cmd_inspect(args) -> int:
    print(inspect_text(args.checkpoint, check_values=args.check_values))
    return 0


def cmd_quantize(args) -> int:
    from .checkpoint import Checkpoint
    from .config import human_bytes
    from .quant import quantize_checkpoint
    out = quantize_checkpoint(args.checkpoint, args.out, scheme=args.scheme)
    ck = Checkpoint.open(out)
    by = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(ck.bytes_by_dtype().items()))
    print(f"wrote {out}: {ck.quant.describe()}; {len(ck.quantized_names())} FP8 expert "
          f"tensors (unfused per expert); {human_bytes(ck.nbytes)} ({by})")
    ck.close()
    return 0


def cmd_plan(args) -> int:
    from .describe import PRESETS
    from .plan import context_plan, context_text, make_plan, plan_text
    target = args.checkpoint
    contexts = [c for part in args.context or [] for c in part.split(",") if c.strip()]
    if args.memory is None and not contexts:
        raise UsageError("plan needs --memory (e.g. --memory 24GB), --context (e.g. "
                         "--context 1M), or both")
    cfg = PRESETS[target]() if target in PRESETS else ModelConfig.from_pretrained(target)
    if args.memory is None:  # the long-context projection alone
        plans = [context_plan(cfg, c, args.dtype) for c in contexts]
        print(f"plan for {target}: {cfg.num_hidden_layers} layers, {args.dtype}")
        print(context_text(plans, cfg))
        return 0
    path = None if target in PRESETS else target
    p = make_plan(cfg, args.memory, dtype=args.dtype, prefill_tokens=args.prefill_tokens,
                  cache=args.cache, backend=args.backend, path=path, context=contexts or None)
    if args.device:
        print(f"device: {args.device} (memory is that device's; reads go host -> device)")
    print(plan_text(p, cfg, target))
    return 0


def cmd_parity(args) -> int:
    import numpy as np

    import workbench as wb
    path = Path(args.checkpoint)
    cfg = ModelConfig.from_pretrained(path)
    resolve(cfg, args.capture)  # an unknown hook name fails before anything is loaded
    ids = _ids_from_args(args, path)
    if ids is None:
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.length))
    a = wb.load(path, backend=args.backend_a, dtype="float32" if args.dtype_a is None
                else args.dtype_a)
    b = wb.load(path, backend=args.backend_b, dtype=args.dtype)
    report = wb.compare(a, b, ids, capture=args.capture, tol=args.tol,
                        near_tie=args.near_tie)
    print(report.summary())
    if args.json:
        Path(args.json).write_text(dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(out_dir=Path(args.out), model=args.model, quick=args.quick)


def cmd_train(args) -> int:
    from .train import main as train_main
    return train_main(args)


def cmd_report(args) -> int:
    from .report import run_report
    return run_report(args)


def cmd_bench(args) -> int:
    import runpy
    here = Path(__file__).resolve().parent.parent / "benchmarks" / "moe_forward.py"
    if not here.exists():
        print("benchmarks/moe_forward.py is part of the source tree; run from a clone",
              file=sys.stderr)
        return 2
    sys.argv = [str(here)] + args.rest
    runpy.run_path(str(here), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="workbench", description=__doc__.split("\n")[0],
                                 epilog="Errors: 'error: ...' and exit status 2 for a user "
                                        "mistake; --debug or WORKBENCH_DEBUG=1 shows the "
                                        "traceback.")
    ap.add_argument("--debug", action="store_true",
                    help="show the Python traceback of an error instead of one line")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("inspect", help="config, tensors, layer map and parameter counts")
    p.add_argument("checkpoint", help="checkpoint dir, config.json, or preset: scout | maverick")
    p.add_argument("--check-values", dest="check_values", action=argparse.BooleanOptionalAction,
                   default=None, help="read every weight and count NaN/Inf (default: for "
                   "checkpoints up to 8 GiB)")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("quantize", help="write an FP8 checkpoint in the compressed-tensors "
                                        "layout (Meta's Maverick-FP8 layout)")
    p.add_argument("checkpoint", help="checkpoint directory to quantise")
    p.add_argument("--out", required=True, help="new directory for the FP8 checkpoint")
    p.add_argument("--scheme", default="fp8-channel", choices=["fp8-channel"],
                   help="fp8-channel: routed experts in FP8 E4M3 with one static scale per "
                   "output channel, activations FP8 per token at run time; attention, "
                   "routers, shared experts, dense MLPs and lm_head stay as stored")
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("plan", help="which mode fits (resident or streamed), bytes and time "
                                    "per prefill and decode step")
    p.add_argument("checkpoint", help="checkpoint dir, config.json, or preset: scout | maverick")
    p.add_argument("--memory", default=None, help="memory budget, e.g. 24GB (needed unless "
                   "--context is given)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32",
                                                           "float8"])
    p.add_argument("--backend", default="torch", choices=["torch", "jax"])
    p.add_argument("--device", default=None, help="where the model would run (e.g. cuda)")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--cache", default=None, help="expert cache budget (max_memory), e.g. 6GB")
    p.add_argument("--context", action="append", default=None, metavar="T",
                   help="long-context projection at T tokens (e.g. 1M, 10M, 262144; K = 1024, "
                   "M = 1024**2; repeat or comma-separate for several): KV cache per layer "
                   "kind and in total, attention FLOPs of a prefill and of a decode step, KV "
                   "bytes read per decoded token")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("parity", help="PyTorch vs JAX (or dtype vs dtype) per-hook report")
    p.add_argument("checkpoint")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype of the second model")
    p.add_argument("--dtype-a", default=None, choices=DTYPES,
                   help="dtype of the first model (float32)")
    p.add_argument("--backend-a", default="torch", choices=BACKENDS)
    p.add_argument("--backend-b", default="jax", choices=BACKENDS)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", default=None)
    src.add_argument("--ids", default=None, type=token_ids, help="token ids, e.g. '1 5 9'")
    p.add_argument("--length", type=positive_int, default=32, help="random ids of this length")
    p.add_argument("--capture", default="*", help="hook names or globs (default: every hook)")
    p.add_argument("--tol", type=non_negative_float, default=None,
                   help="relative tolerance per hook (default 2e-4 fp32, 5e-2 with bf16)")
    p.add_argument("--near-tie", type=non_negative_float, default=None,
                   help="router margin under which a flip counts as a near-tie")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.set_defaults(fn=cmd_parity)

    p = sub.add_parser("demo", help="the main job on the bundled model")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--model", default=None, help="checkpoint dir (default: bundled model)")
    p.add_argument("--quick", action="store_true", help="fewer prompts, shorter generation")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("train", help="train a Llama-4-architecture MoE on the bundled corpus")
    from .train import add_arguments
    add_arguments(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("report", help="the research figure set and metrics.json")
    from .report import add_arguments as report_args
    report_args(p)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("bench", help="run benchmarks/moe_forward.py")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)

    for name, p in sub.choices.items():  # --debug after the subcommand too
        if name != "bench":  # bench passes every argument through
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the Python traceback of an error instead of one line")
    return ap


def _check_paths(args: argparse.Namespace) -> None:
    """Output paths that cannot work, refused before any work is done."""
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file; pass a directory (it is created if needed)")
    js = getattr(args, "json", None)
    if js is not None and Path(js).is_dir():
        raise UsageError(f"--json {js} is a directory; pass a file name")


def _ours(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by a ``raise`` statement in the workbench package (one of its
    argument checks), not inside numpy, torch, jax or the standard library."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        Path(tb.tb_frame.f_code.co_filename).resolve().relative_to(PACKAGE_DIR)
    except ValueError:
        return False
    return True


def user_error(exc: BaseException) -> bool:
    """True for an error that is the user's to fix (``error: ...``, exit 2), False for a bug."""
    return isinstance(exc, USER_ERRORS) or (type(exc) is ValueError and _ours(exc)) or (
        isinstance(exc, ValueError) and type(exc).__module__.startswith("workbench"))


def debugging(args: argparse.Namespace | None = None) -> bool:
    """``--debug`` given, or ``WORKBENCH_DEBUG`` set to anything but '' or '0'."""
    return bool(getattr(args, "debug", False)) or os.environ.get("WORKBENCH_DEBUG", "") \
        not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        _check_paths(args)
        return args.fn(args)
    except Exception as e:
        if debugging(args) or not user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
