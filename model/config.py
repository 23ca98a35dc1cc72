"""Model configuration: a typed dataclass whose fields follow transformers' ``DeepseekV3Config`` names.

``ModelConfig.from_hf`` reads a real ``config.json`` (official layout with ``rope_scaling``, or transformers-v5
layout with ``rope_parameters``); ``to_hf`` writes the official layout back. Named presets live in ``PRESETS``.
Every construction (``ModelConfig(...)``, ``replace``, ``preset``, ``from_hf``) checks field types and values and
raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys a real config.json carries that say nothing about the network itself; accepted and dropped.
_HF_METADATA_KEYS = {
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "use_cache",
    "pretraining_tp",
    "ep_size",
    "attention_dropout",
    "output_router_logits",
    "head_dim",
    "qk_head_dim",
    "num_mtp_layers",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "is_encoder_decoder",
    "chunk_size_feed_forward",
    "problem_type",
    "tokenizer_class",
    "id2label",
    "label2id",
    "task_specific_params",
    "generation_config",
}

# Keys a config.json must carry: they fix tensor shapes or the routing fan-out, and ModelConfig's defaults are the
# 671B model's, so a config.json without them would silently describe (and allocate) that model. The other keys
# default to DeepSeek-V3's values as in transformers' DeepseekV3Config (num_key_value_heads to num_attention_heads).
REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "first_k_dense_replace",
    "num_attention_heads",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "q_lora_rank",  # may be null (no query compression), but must be said
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)

_EXTRA_FIELDS = ("mtp_hidden", "route_num_nodes", "route_max_nodes")
_RUNTIME_FIELDS = ("fp8", "fp8_pow2_scales")


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture hyperparameters (HF field names; see docs/SPEC.md section 1)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense (first_k_dense_replace) layers
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1  # MTP depth D
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # MLA: must equal num_attention_heads
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 1e-4  # complementary sequence-wise balance loss weight (0 disables)
    seq_aux: bool = True
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.006
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    quantization_config: dict[str, Any] | None = None
    # dsalign extensions (written to config.json only when set; transformers ignores them).
    mtp_hidden: str = field(default="post_norm", metadata={"help": "main hidden fed to MTP: post_norm | pre_norm"})
    route_num_nodes: int | None = field(default=None, metadata={"help": "node-limited routing: nodes experts span"})
    route_max_nodes: int | None = field(default=None, metadata={"help": "node-limited routing: M nodes per token"})
    # Runtime switches (never written to config.json): which kernels the projections run on.
    fp8: bool = field(default=False, metadata={"help": "FP8 block-scaled GEMMs for the quantizable projections"})
    fp8_pow2_scales: bool = field(default=False, metadata={"help": "power-of-two (ue8m0) FP8 scales"})

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MoE at ``layer_idx >= first_k_dense_replace`` (every ``moe_layer_freq``); MTP blocks count from N."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim^-0.5 * m^2`` with the YaRN mscale ``m = 0.1 * mscale_all_dim * ln(factor) + 1``."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn":
            mscale_all_dim = rs.get("mscale_all_dim", 0)
            factor = rs.get("factor", 1.0)
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    # ------------------------------------------------------------------ validation
    def _check_node_and_group_limits(self, nodes: int, m: int, per_group: int, bad) -> None:
        """Node-limited then group-limited routing must leave at least ``num_experts_per_tok`` experts: each limit
        masks experts to -inf, and a top-k over fewer finite experts silently takes masked ones (breaking both
        limits). With nested partitions the worst case is known: groups inside nodes keep min(topk_group, groups
        in the kept nodes) whole groups; nodes inside groups keep min(topk_group, route_max_nodes) whole nodes (a
        group scores its top-2 experts, so a node needs 2 of them for its group to score finite)."""
        e, k = self.n_routed_experts, self.num_experts_per_tok
        if self.n_group % nodes == 0:
            surviving = min(self.topk_group, m * (self.n_group // nodes)) * per_group
        elif nodes % self.n_group == 0:
            if e // nodes < 2:
                bad(f"group-limited routing inside nodes needs >= 2 experts per node, got {e // nodes}")
            surviving = min(self.topk_group, m) * (e // nodes)
        else:
            bad(f"node-limited and group-limited routing need nested partitions: n_group={self.n_group} and "
                f"route_num_nodes={nodes} must divide one another")  # fmt: skip
        if surviving < k:
            bad(f"node limit (route_max_nodes={m} of {nodes}) then group limit (topk_group={self.topk_group} of "
                f"{self.n_group}) can leave {surviving} experts for num_experts_per_tok={k}")  # fmt: skip

    def validate(self) -> None:
        """Fail early, naming the field, on values the architecture cannot run."""

        def bad(msg: str) -> None:
            raise ValueError(f"invalid ModelConfig: {msg}")

        wrong_types = _type_errors(self)
        if wrong_types:  # before the value checks, which would fail on them with a bare TypeError
            bad("; ".join(wrong_types))
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_key_value_heads != self.num_attention_heads:
            bad(
                f"MLA shares one latent across heads: num_key_value_heads ({self.num_key_value_heads}) must equal "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad(f"q_lora_rank must be > 0 or null, got {self.q_lora_rank}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad(f"first_k_dense_replace={self.first_k_dense_replace} outside [0, {self.num_hidden_layers}]")
        if self.num_nextn_predict_layers < 0:
            bad(f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        if self.moe_layer_freq <= 0:
            bad(f"moe_layer_freq must be > 0, got {self.moe_layer_freq}")
        if self.n_routed_experts > 0:
            if self.n_group <= 0:
                bad(f"n_group must be > 0, got {self.n_group}")
            if self.n_routed_experts % self.n_group:
                bad(f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
            if not 1 <= self.topk_group <= self.n_group:
                bad(f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            if per_group < 2:
                bad(f"each group needs >= 2 experts (group score sums the top 2), got {per_group}")
            if not 1 <= self.num_experts_per_tok <= self.topk_group * per_group:
                bad(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, topk_group * experts per "
                    f"group = {self.topk_group * per_group}]"
                )
            if self.route_max_nodes is not None or self.route_num_nodes is not None:
                nodes, m = self.route_num_nodes, self.route_max_nodes
                if nodes is None or m is None:
                    bad("node-limited routing needs both route_num_nodes and route_max_nodes")
                if nodes <= 0 or self.n_routed_experts % nodes or not 1 <= m <= nodes:
                    bad(f"route_num_nodes={nodes} must divide n_routed_experts and 1 <= route_max_nodes={m} <= it")
                if self.num_experts_per_tok % m:
                    bad(f"num_experts_per_tok ({self.num_experts_per_tok}) must be divisible by route_max_nodes={m}")
                if self.topk_group < self.n_group:
                    self._check_node_and_group_limits(nodes, m, per_group, bad)
        if self.scoring_func != "sigmoid":
            bad(f"scoring_func {self.scoring_func!r} not supported (DeepSeek-V3 uses 'sigmoid')")
        if self.topk_method != "noaux_tc":
            bad(f"topk_method {self.topk_method!r} not supported (DeepSeek-V3 uses 'noaux_tc')")
        if self.hidden_act != "silu":
            bad(f"hidden_act {self.hidden_act!r} not supported (expected 'silu')")
        if self.mtp_hidden not in ("post_norm", "pre_norm"):
            bad(f"mtp_hidden must be 'post_norm' or 'pre_norm', got {self.mtp_hidden!r}")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ("yarn", "default", None):
                bad(f"rope_scaling type {kind!r} not supported (expected 'yarn')")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in rs:
                        bad(f"rope_scaling of type yarn needs {key!r}")
        qc = self.quantization_config
        if qc is not None:
            if qc.get("quant_method") != "fp8":
                bad(f"quantization_config.quant_method {qc.get('quant_method')!r} not supported (expected 'fp8')")
            if list(qc.get("weight_block_size", [128, 128])) != [128, 128]:
                bad(f"quantization_config.weight_block_size {qc.get('weight_block_size')} (expected [128, 128])")

    # ------------------------------------------------------------------ HF round trip
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` path, a checkpoint directory, or an already-parsed dict.

        The keys in ``REQUIRED_HF_KEYS`` (the sizes that fix tensor shapes and the routing fan-out) must be present:
        ``ModelConfig``'s defaults are the 671B model's, which an incomplete file must not silently become. Errors
        are ``ValueError`` naming the file (or "config dict") and the keys.
        """
        where = "config dict"
        if isinstance(source, dict):
            raw = dict(source)
        else:
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: expected a JSON object of config keys, got {type(raw).__name__}")
        model_type = raw.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "kimi_k2"):
            raise ValueError(f"{where}: model_type {model_type!r} is not a DeepSeek-V3 architecture")
        if "num_mtp_layers" in raw:  # transformers v5 alias of num_nextn_predict_layers
            raw.setdefault("num_nextn_predict_layers", raw.pop("num_mtp_layers"))
        rope_params = raw.pop("rope_parameters", None)
        if rope_params is not None and not isinstance(rope_params, dict):
            raise ValueError(f"{where}: rope_parameters must be a dict, got {type(rope_params).__name__}")
        if rope_params:  # transformers v5 layout: rope_theta and the scaling live in one dict
            rope_params = dict(rope_params)
            raw.setdefault("rope_theta", rope_params.pop("rope_theta", 10000.0))
            kind = rope_params.pop("rope_type", rope_params.pop("type", "default"))
            if kind != "default" and "rope_scaling" not in raw:
                raw["rope_scaling"] = {"type": kind, **rope_params}
        if "num_attention_heads" in raw:  # as transformers: MLA's key/value heads are the attention heads
            raw.setdefault("num_key_value_heads", raw["num_attention_heads"])
        known = {f.name for f in dataclasses.fields(cls)}
        problems = []
        unknown = sorted(k for k in raw if k not in known and k not in _HF_METADATA_KEYS)
        if unknown:
            problems.append(f"unknown config keys {unknown}; valid keys are {sorted(known)}")
        missing = [k for k in REQUIRED_HF_KEYS if k not in raw]
        if missing:
            problems.append(
                f"missing required keys {missing} (the architecture sizes have no default here: ModelConfig's "
                "defaults are the 671B DeepSeek-V3)"
            )
        if problems:
            raise ValueError(f"{where}: " + "; ".join(problems))
        kwargs = {k: v for k, v in raw.items() if k in known}
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def to_hf(self) -> dict[str, Any]:
        """The official ``config.json`` layout (``rope_scaling`` dict, ``num_nextn_predict_layers``)."""
        out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _RUNTIME_FIELDS or (f.name in _EXTRA_FIELDS and value == f.default):
                continue
            if f.name == "quantization_config" and value is None:
                continue
            out[f.name] = copy.deepcopy(value)  # dicts (rope_scaling) must not be shared with whoever edits the output
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        fresh = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}
        return dataclasses.replace(self, **{**fresh, **changes})

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**PRESETS[name])


# ---------------------------------------------------------------------------------------------------- type checks
@functools.cache
def _field_types() -> dict[str, Any]:
    """Field name -> its annotation, resolved (the module's ``from __future__ import annotations`` makes strings)."""
    return typing.get_type_hints(ModelConfig)


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits annotation ``tp``: bools are not ints, ints are floats, containers by their origin."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    return isinstance(value, origin or tp)


def _type_name(tp: Any) -> str:
    """``int | list[int] | None`` -> ``'int or list of int or None'``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if tp is float:
        return "float (or int)"
    return getattr(origin or tp, "__name__", str(tp))


def _type_errors(cfg: ModelConfig) -> list[str]:
    """One message per field whose value does not match its annotation (key, expected type, value got)."""
    errors = []
    for name, tp in _field_types().items():
        value = getattr(cfg, name)
        if not _type_ok(value, tp):
            errors.append(f"{name} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return errors


PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: a forward in milliseconds; still has a dense layer, MoE layers, groups, q_lora and MTP.
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=1024,
        num_nextn_predict_layers=1,
        initializer_range=0.02,
    ),
    # Demo pipeline: a few million parameters, trains on 2 CPU cores.
    "small": dict(
        vocab_size=512,
        hidden_size=192,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=6,
        num_key_value_heads=6,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=2048,
        num_nextn_predict_layers=1,
        initializer_range=0.02,
    ),
    # Benchmarks (fixed by the issue; do not change).
    "bench": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=256,
        num_hidden_layers=8,
        first_k_dense_replace=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        n_routed_experts=32,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        tie_word_embeddings=False,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
        initializer_range=0.02,
    ),
    # The real DeepSeek-V3 671B configuration.
    "v3-671b": dict(
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        quantization_config={
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    ),
}
