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


def _generate(args: argparse.Namespace) -> int:
    from dsalign.pipelines.generate import run_generate

    return run_generate(args)


def _chat(args: argparse.Namespace) -> int:
    from dsalign.pipelines.generate import run_chat

    return run_chat(args)


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--checkpoint", required=True, help="HF-format checkpoint directory (config, weights, tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="completion length cap")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible outputs)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-len", type=int, default=None, help="context per sequence (default: the model's)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsalign", description="Post-training for DeepSeek-V3-architecture models")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect models").add_subparsers(dest="model_command", required=True)
    info = model.add_parser("info", help="total and activated parameters per part")
    info.add_argument("--preset", help="named preset: tiny, small, bench, v3-671b")
    info.add_argument("--checkpoint", help="an HF checkpoint directory (reads config.json only)")
    info.set_defaults(func=_model_info)

    gen = sub.add_parser("generate", help="complete the prompts of a JSONL file with the rollout engine")
    _add_sampling_args(gen, temperature=1.0)
    gen.add_argument("--prompts", required=True, help="JSONL: {'prompt': text | messages} or {'prompt_ids': [...]}")
    gen.add_argument("--output", help="JSONL file for the completions (default: stdout)")
    gen.add_argument("--n", type=int, default=1, help="samples per prompt (share the prompt's prefill)")
    gen.add_argument("--batch-size", type=int, default=8, help="sequences decoded together")
    gen.add_argument("--cache-dtype", choices=["auto", "fp32", "bf16", "fp8"], default="auto", help="latent cache")
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="streaming multi-turn chat with a checkpoint")
    _add_sampling_args(chat, temperature=0.7)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        print(f"dsalign: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
