"""The ``dsalign`` command line. Subcommands import what they need lazily, so ``dsalign model info`` stays fast."""

from __future__ import annotations

import argparse
import sys


def _model_info(args: argparse.Namespace) -> int:
    from dsalign.model import ModelConfig
    from dsalign.model.info import format_report, summarize

    if (args.preset is None) == (args.checkpoint is None):
        print("dsalign model info: give exactly one of --preset NAME or --checkpoint DIR", file=sys.stderr)
        return 2
    if args.preset is not None:
        cfg, title = ModelConfig.preset(args.preset), f"preset {args.preset}"
    else:
        cfg, title = ModelConfig.from_hf(args.checkpoint), f"checkpoint {args.checkpoint}"
    print(format_report(summarize(cfg), f"dsalign model info: {title} (built on the meta device)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsalign", description="Post-training for DeepSeek-V3-architecture models")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect models").add_subparsers(dest="model_command", required=True)
    info = model.add_parser("info", help="total and activated parameters per part")
    info.add_argument("--preset", help="named preset: tiny, small, bench, v3-671b")
    info.add_argument("--checkpoint", help="an HF checkpoint directory (reads config.json only)")
    info.set_defaults(func=_model_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"dsalign: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
