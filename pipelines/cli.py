"""The ``dsalign`` command line. Subcommands import what they need lazily, so ``dsalign model info`` stays fast."""

from __future__ import annotations

import argparse
import contextlib
import os
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
        from pathlib import Path

        from dsalign.model import check_checkpoint
        from dsalign.model.checkpoint import LoadReport

        cfg, title = ModelConfig.from_hf(args.checkpoint), f"checkpoint {args.checkpoint}"
        if any(Path(args.checkpoint).glob("*.safetensors")):  # the model load_checkpoint builds (weight headers only)
            built = check_checkpoint(args.checkpoint, report=LoadReport())  # its missing-MTP note: the title says it
            if built.num_nextn_predict_layers != cfg.num_nextn_predict_layers:
                title += (f"; config.json declares {cfg.num_nextn_predict_layers} MTP layer(s) but the weights have "
                          "none (transformers' save_pretrained drops them): not counted")  # fmt: skip
            cfg = built
    print(format_report(summarize(cfg), f"dsalign model info: {title} (built on the meta device)"))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from dsalign.pipelines.generate import run_generate

    return run_generate(args)


def _chat(args: argparse.Namespace) -> int:
    from dsalign.pipelines.generate import run_chat

    return run_chat(args)


def _eval(args: argparse.Namespace) -> int:
    from dsalign.pipelines.evaluate import run_eval

    return run_eval(args)


def _run(args: argparse.Namespace) -> int:
    from dsalign.pipelines.config import load_config
    from dsalign.pipelines.runner import run

    cfg = load_config(args.config, args.set)
    if args.address:
        cfg.ray.address = args.address
    run(cfg, resume=args.resume)
    return 0


def _demo(args: argparse.Namespace) -> int:

    from dsalign.pipelines.config import DEMO_CONFIG

    args.config = str(DEMO_CONFIG)
    return _run(args)


def _config(args: argparse.Namespace) -> int:
    if args.config_command == "reference":
        from dsalign.pipelines.config_doc import config_reference

        print(config_reference(), end="")
        return 0
    import yaml
    from dsalign.pipelines.config import config_notes, load_config
    from dsalign.pipelines.preflight import preflight
    from dsalign.pipelines.schema import to_dict

    cfg = load_config(args.config, args.set)
    preflight(cfg)  # the checks `dsalign run` makes before starting Ray
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    for note in config_notes(cfg):
        print(f"# note: {note}", file=sys.stderr)
    print(f"# {args.config}: valid; {len(cfg.stages)} stage(s): {', '.join(s.name for s in cfg.stages)}",
          file=sys.stderr)  # fmt: skip
    return 0


@contextlib.contextmanager
def _working_dir(path):
    """``contextlib.chdir`` (Python 3.11+), for 3.10."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _submit(args: argparse.Namespace) -> int:
    from dsalign.pipelines import jobs
    from dsalign.pipelines.config import load_config
    from dsalign.pipelines.preflight import preflight
    from dsalign.pipelines.schema import ConfigError

    # fail here, not on the cluster; and check what the job will see: it runs in its working dir, so the config's
    # relative paths resolve there, not in this shell's directory
    root, rel = jobs.job_paths(args.config, args.working_dir)
    with _working_dir(root):
        try:
            preflight(load_config(rel, args.set))
        except ConfigError as e:
            raise ConfigError(f"{e}\n(relative paths are checked from {root}, the job's working directory, where the "
                              "job runs; see --working-dir)") from e  # fmt: skip
    job_id = jobs.submit(args.config, args.address, args.working_dir, args.set, args.resume)
    print(job_id)
    if args.wait:
        status = jobs.wait(job_id, args.address, timeout_s=args.wait)
        print(status)
        return 0 if status == "SUCCEEDED" else 1
    return 0


def _job(args: argparse.Namespace) -> int:
    from dsalign.pipelines import jobs

    if args.command == "status":
        print(jobs.status(args.job_id, args.address))
    elif args.command == "logs":
        print(jobs.logs(args.job_id, args.address), end="")
    else:
        print("stopped" if jobs.stop(args.job_id, args.address) else "not running")
    return 0


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stages.grpo.grpo.iterations=10 (repeatable)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="skip finished stages, continue the last one")


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--checkpoint", required=True, help="HF-format checkpoint directory (config, weights, tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="completion length cap")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed, reproducible (generate: prompt i samples with seed*1000003+i)")  # fmt: skip
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-len", type=int, default=None, help="context per sequence (default: the model's)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")  # fmt: skip


def _device(text: str) -> str:
    """argparse type: a torch device this machine has (argparse names the flag when this raises)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device available here (use cpu)")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s), cuda:0..{count - 1}")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are supported")
    return text


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag when this raises)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsalign", description="Post-training for DeepSeek-V3-architecture models")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect models").add_subparsers(dest="model_command", required=True)
    info = model.add_parser("info", help="total and activated parameters per part")
    info.add_argument("--preset", help="named preset: tiny, small, bench, v3-671b")
    info.add_argument("--checkpoint", help="an HF checkpoint directory (config.json, and the weights' headers when "
                                           "present; no tensor is read)")
    info.set_defaults(func=_model_info)

    gen = sub.add_parser("generate", help="complete the prompts of a JSONL file with the rollout engine")
    _add_sampling_args(gen, temperature=1.0)
    gen.add_argument("--prompts", required=True,
                     help="JSONL rows: {'prompt': question | messages} (chat), {'text': raw} or {'prompt_ids': [...]}")
    gen.add_argument("--output", help="JSONL file for the completions (default: stdout)")
    gen.add_argument("--n", type=int, default=1, help="samples per prompt (share the prompt's prefill)")
    gen.add_argument("--batch-size", type=_positive_int, default=8, help="sequences decoded together")
    gen.add_argument("--cache-dtype", choices=["auto", "fp32", "bf16", "fp8"], default="auto", help="latent cache")
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="streaming multi-turn chat with a checkpoint")
    _add_sampling_args(chat, temperature=0.7)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=_chat)

    ev = sub.add_parser("eval", help="held-out accuracy of checkpoints on the same prompts and samples (paired)")
    ev.add_argument("checkpoints", nargs="+", help="HF-format checkpoint directories with their tokenizers")
    ev.add_argument("--config", default=None,
                    help="a run config whose eval block and synthetic task to use ('demo': the demo's)")  # fmt: skip
    ev.add_argument("--prompts", default=None, help="held-out JSONL (prompt + answer columns); default: the "
                    "synthetic task's held-out set")  # fmt: skip
    ev.add_argument("--num-prompts", type=int, default=None, help="the first N prompts (eval.num_prompts)")
    ev.add_argument("--samples", type=int, default=None, help="samples per prompt (eval.samples_per_prompt)")
    ev.add_argument("--temperature", type=float, default=None, help="sampling temperature, 0 = greedy")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="completion length cap")
    ev.add_argument("--seed", type=int, default=None, help="sampling seed (the same for every checkpoint)")
    ev.add_argument("--reward", default=None, help="what accuracy averages: a built-in name, pkg.module:fn or "
                    "file.py:fn (default math_accuracy)")  # fmt: skip
    ev.add_argument("--length-target", type=_positive_int, default=None,
                    help="evaluate on budget prompts of N tokens")  # fmt: skip
    ev.add_argument("--batch-size", type=_positive_int, default=None, help="decode slots (eval.max_batch_size)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any run-config key, e.g. --set eval.max_new_tokens=128; a mapping is replaced "
                         "whole: --set 'eval.reward={fn: think_format}'")  # fmt: skip
    ev.add_argument("--device", type=_device, default=None,
                    help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")  # fmt: skip
    ev.add_argument("--output", default=None, help="JSONL file for every sample with its reward")
    ev.add_argument("--json", action="store_true", help="one JSON line per checkpoint instead of the table")
    ev.set_defaults(func=_eval)

    config = sub.add_parser("config", help="check and print run configs; the key reference")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="validate a run config (as `run` does, no Ray) and print it resolved")
    show.add_argument("config", help="run config YAML")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    show.set_defaults(func=_config)
    ref = config_sub.add_parser("reference", help="every run-config key with type, default and meaning (Markdown)")
    ref.set_defaults(func=_config)

    run = sub.add_parser("run", help="run a pipeline config (local Ray unless an address is given)")
    run.add_argument("config", help="run config YAML (see pipelines/demo.yaml)")
    run.add_argument("--address", default=None, help="Ray cluster address to join instead of starting one")
    _add_run_args(run)
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="the built-in demo: SFT -> GRPO -> distillation -> length control")
    demo.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    _add_run_args(demo)
    demo.set_defaults(func=_demo)

    submit = sub.add_parser("submit", help="submit a run config as a Ray Job; prints the job id")
    submit.add_argument("config")
    submit.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    submit.add_argument("--working-dir", default=None, help="directory shipped with the job (default: the config's)")
    submit.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait for the job to finish")
    _add_run_args(submit)
    submit.set_defaults(func=_submit)

    for name, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        p.add_argument("--address", required=True, help="Ray dashboard address")
        p.set_defaults(func=_job)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import StageFailed

    try:
        return args.func(args)
    except StageFailed as e:  # the stage's own error is in the message; Ray has already logged the worker's traceback
        print(f"dsalign: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM during a run (pipelines.runner turns it into this)
        print("dsalign: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, TypeError, FileNotFoundError, NotADirectoryError) as e:
        print(f"dsalign: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
