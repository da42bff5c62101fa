"""``workbench`` command line: inspect | demo | parity | train | report | bench."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig
from .describe import inspect_text
from .jsonio import dumps


def _ids_from_args(args, tokenizer_dir: Path | None):
    import numpy as np
    if getattr(args, "ids", None):
        return np.array([[int(t) for t in args.ids.replace(",", " ").split()]])
    text = getattr(args, "text", None)
    if text is not None:
        from .tokenizer import Tokenizer
        if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").exists():
            raise SystemExit(f"--text needs a tokenizer.json beside the checkpoint "
                             f"({tokenizer_dir}); pass --ids instead")
        return np.array([Tokenizer.from_pretrained(tokenizer_dir).encode(text)])
    return None


def cmd_inspect(args) -> int:
    print(inspect_text(args.checkpoint))
    return 0


def cmd_parity(args) -> int:
    import numpy as np

    import workbench as wb
    path = Path(args.checkpoint)
    ids = _ids_from_args(args, path)
    if ids is None:
        cfg = ModelConfig.from_pretrained(path)
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
    ap = argparse.ArgumentParser(prog="workbench", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("inspect", help="config, tensors, layer map and parameter counts")
    p.add_argument("checkpoint", help="checkpoint dir, config.json, or preset: scout | maverick")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("parity", help="PyTorch vs JAX (or dtype vs dtype) per-hook report")
    p.add_argument("checkpoint")
    p.add_argument("--dtype", default="float32", help="dtype of the second model")
    p.add_argument("--dtype-a", default=None, help="dtype of the first model (float32)")
    p.add_argument("--backend-a", default="torch")
    p.add_argument("--backend-b", default="jax")
    p.add_argument("--text", default=None)
    p.add_argument("--ids", default=None, help="token ids, e.g. '1 5 9'")
    p.add_argument("--length", type=int, default=32, help="random ids of this length")
    p.add_argument("--capture", default="*")
    p.add_argument("--tol", type=float, default=None,
                   help="relative tolerance per hook (default 2e-4 fp32, 5e-2 with bf16)")
    p.add_argument("--near-tie", type=float, default=None,
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
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
