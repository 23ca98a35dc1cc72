"""Parameter accounting: total and activated parameters per part, for the main model and the MTP modules.

"Activated" counts what one token touches: everything except the routed experts it is not sent to
(``num_experts_per_tok`` of ``n_routed_experts``). The MTP module is reported separately; its embedding and output
head are the main model's, so they add nothing unique.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .config import ModelConfig
from .transformer import Transformer

PARTS = ("embedding", "attention", "dense_mlp", "shared_experts", "routed_experts", "gate", "norms", "head", "mtp_proj")


def _part(name: str) -> str:
    if name.startswith("embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    if ".experts." in name:
        return "routed_experts"
    if ".shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "gate"
    if "norm" in name:
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if ".eh_proj." in name:
        return "mtp_proj"
    if ".mlp." in name:
        return "dense_mlp"
    raise ValueError(f"parameter {name} belongs to no known part")


def count_parameters(model: Transformer) -> dict[str, dict[str, dict[str, int]]]:
    """``{"main"|"mtp": {part: {"total": n, "activated": n}}}``; works on meta-device models."""
    cfg = model.cfg
    active_frac = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0
    out: dict[str, dict[str, dict[str, int]]] = {"main": OrderedDict(), "mtp": OrderedDict()}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        where = "mtp" if name.startswith("mtp.") else "main"
        part = _part(name)
        n = p.numel()
        slot = out[where].setdefault(part, {"total": 0, "activated": 0})
        slot["total"] += n
        slot["activated"] += round(n * active_frac) if part == "routed_experts" else n
    return out


def summarize(cfg: ModelConfig) -> dict[str, dict[str, dict[str, int]]]:
    """Count parameters of a config without allocating memory (meta device)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return count_parameters(model)


def format_report(counts: dict[str, dict[str, dict[str, int]]], title: str) -> str:
    def b(n: int) -> str:
        return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"

    lines = [title, f"{'part':<18}{'total':>14}{'activated':>14}"]
    for where, label in (("main", "main model"), ("mtp", "MTP modules")):
        parts = counts[where]
        if not parts:
            lines.append(f"{label}: none")
            continue
        lines.append(f"-- {label}")
        for part, c in parts.items():
            lines.append(f"{part:<18}{b(c['total']):>14}{b(c['activated']):>14}")
        tot = sum(c["total"] for c in parts.values())
        act = sum(c["activated"] for c in parts.values())
        lines.append(f"{label + ' total':<18}{b(tot):>14}{b(act):>14}")
    if counts["mtp"]:
        shared = sum(counts["main"][p]["total"] for p in ("embedding", "head") if p in counts["main"])
        act = totals(counts, "mtp")[1]
        lines.append(f"MTP activated per token incl. the shared embedding and head: {b(act + shared)}")
    return "\n".join(lines)


def totals(counts: dict[str, dict[str, dict[str, int]]], where: str = "main") -> tuple[int, int]:
    parts = counts[where].values()
    return sum(c["total"] for c in parts), sum(c["activated"] for c in parts)
