"""`fastprocon report`: redraw a run's dashboard from its metrics.jsonl."""
from __future__ import annotations

import argparse
from pathlib import Path

from fastprocon.train.dashboard import DASHBOARD_FILE, draw_dashboard
from fastprocon.utils.io import check_output


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="draw a run's dashboard (loss, refusal score, drift, projection deviation) from metrics.jsonl",
        description="Redraw RUN_DIR/dashboard.png from RUN_DIR/metrics.jsonl: CE and ProCon over steps, and the "
                    "safety probe's refusal scores, drift heatmap (layer x step) and projection deviation per layer "
                    "(train.safety_probe_every). Works on a run in progress.")
    p.add_argument("run_dir", help="a training run directory")
    p.add_argument("--out", help=f"output PNG (default: RUN_DIR/{DASHBOARD_FILE})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not Path(args.run_dir).is_dir():
        raise FileNotFoundError(f"run directory not found: {args.run_dir}")
    if args.out:
        check_output(args.out, {"RUN_DIR/metrics.jsonl": str(Path(args.run_dir) / "metrics.jsonl")})
    print(f"wrote {draw_dashboard(args.run_dir, args.out)}")
    return 0
