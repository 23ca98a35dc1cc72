"""Checkpoints in the HF format (docs/SPEC.md section 6).

Reads: ``config.json`` + safetensors (one file, or shards with ``model.safetensors.index.json``); routed experts as
the official per-expert keys or transformers-v5 fused ``gate_up_proj`` / ``down_proj``; FP8 weights with
``weight_scale_inv`` (128x128 blocks, padded edges); MTP layers at index ``num_hidden_layers + k``.
Loading streams tensor by tensor into a model built on the meta device, so peak memory is about one model copy.
Before anything is allocated the checkpoint's keys are matched against the model: missing parameters, unexpected
tensors and layer counts that disagree with ``config.json`` fail with one ``ValueError`` that reports them all.

Writes: the official layout (per-expert keys, MTP layers with their copies of the shared embedding and head,
shards plus an index, ``config.json``), into a temporary directory that is renamed into place.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .transformer import Transformer

log = logging.getLogger(__name__)

_EXPERT_KEY = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)$")
_SHARED_MTP = {"embed_tokens.weight": "embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight"}
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary\.inv_freq)$")
_MTP_MARK = ("enorm.weight", "hnorm.weight", "eh_proj.weight")  # keys only an MTP layer has
_EXAMPLES = 5  # keys quoted per kind in a mismatch error


@dataclass
class Target:
    """Where a checkpoint tensor goes: our parameter name, plus (expert index, 'gate'|'up'|None) for a slice."""

    name: str
    expert: int | None = None
    part: str | None = None
    shared_copy: bool = False  # an MTP layer's copy of the main embedding / head: checked, not loaded


def hf_to_ours(key: str, cfg: ModelConfig) -> Target | None:
    """Map one HF checkpoint key to its place in ``Transformer``; None when the key is not ours."""
    if _IGNORED.search(key):
        return None
    m = _LAYER_KEY.match(key)
    if m is None:
        if key.startswith("model."):
            return Target(key[len("model.") :])
        return Target(key) if key == "lm_head.weight" else None
    layer, rest = int(m.group(1)), m.group(2)
    if layer < cfg.num_hidden_layers:
        prefix = f"layers.{layer}."
    else:
        k = layer - cfg.num_hidden_layers
        if k >= cfg.num_nextn_predict_layers:
            return None
        if rest in _SHARED_MTP:
            return Target(_SHARED_MTP[rest], shared_copy=True)
        if rest in _MTP_OWN:
            return Target(f"mtp.{k}.{_MTP_OWN[rest]}")
        if rest == "shared_head.norm.weight":
            return Target(f"mtp.{k}.norm.weight")
        prefix = f"mtp.{k}.block."
    e = _EXPERT_KEY.search(rest)
    if e is not None:
        expert, proj = int(e.group(1)), e.group(2)
        if proj == "down":
            return Target(prefix + "mlp.experts.down_proj", expert=expert)
        return Target(prefix + "mlp.experts.gate_up_proj", expert=expert, part=proj)
    return Target(prefix + rest)


def ours_to_hf(model: Transformer) -> Iterator[tuple[str, Callable[[], torch.Tensor], torch.Size, torch.dtype]]:
    """Yield (hf_key, make_tensor, shape, dtype) in the official layout; tensors are produced lazily."""
    cfg = model.cfg
    state = model.state_dict()
    n = cfg.num_hidden_layers
    for name, t in state.items():
        if name.startswith("rotary."):
            continue
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        m = re.match(r"(layers\.(\d+)|mtp\.(\d+)\.block)\.(.+)$", name)
        mm = re.match(r"mtp\.(\d+)\.(enorm|hnorm|eh_proj|norm)\.weight$", name)
        if mm is not None:
            k, part = int(mm.group(1)), mm.group(2)
            suffix = "shared_head.norm.weight" if part == "norm" else f"{part}.weight"
            yield f"model.layers.{n + k}.{suffix}", (lambda t=t: t), t.shape, t.dtype
            continue
        if m is None:
            yield f"model.{name}" if name != "lm_head.weight" else name, (lambda t=t: t), t.shape, t.dtype
            continue
        layer = int(m.group(2)) if m.group(2) is not None else n + int(m.group(3))
        rest = m.group(4)
        prefix = f"model.layers.{layer}."
        if rest.endswith("mlp.experts.gate_up_proj"):
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                for j, proj in enumerate(("gate", "up")):
                    key = f"{prefix}mlp.experts.{e}.{proj}_proj.weight"
                    sl = slice(j * inter, (j + 1) * inter)
                    yield key, (lambda t=t, e=e, sl=sl: t[e, sl].contiguous()), torch.Size([inter, t.shape[2]]), t.dtype
        elif rest.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                key = f"{prefix}mlp.experts.{e}.down_proj.weight"
                yield key, (lambda t=t, e=e: t[e].contiguous()), t.shape[1:], t.dtype
        else:
            yield prefix + rest, (lambda t=t: t), t.shape, t.dtype
    emb = state["embed_tokens.weight"]
    head = state.get("lm_head.weight", emb)
    for k in range(cfg.num_nextn_predict_layers):
        yield f"model.layers.{n + k}.embed_tokens.weight", (lambda: emb.clone()), emb.shape, emb.dtype
        yield f"model.layers.{n + k}.shared_head.head.weight", (lambda: head.clone()), head.shape, head.dtype


# Projections the FP8 recipe keeps in high precision (embedding, head, gate, norms) never get quantized.
def _fp8_quantizable(hf_key: str, shape: torch.Size) -> bool:
    if len(shape) != 2 or not hf_key.endswith(".weight"):
        return False
    skip = ("embed_tokens", "lm_head", "shared_head.head", "mlp.gate.weight", "norm", "layernorm")
    return not any(s in hf_key for s in skip)


# ---------------------------------------------------------------------------------------------------- reading
def _open_shard(file: Path):
    """An entered ``safe_open`` handle (the caller exits it); a corrupt or truncated file names itself."""
    try:
        return safe_open(str(file), framework="pt", device="cpu").__enter__()
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def _read_tensor(handle, file: Path, key: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except SafetensorError as e:
        raise ValueError(f"{file}: cannot read tensor {key} ({e})") from e


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """key -> file for every tensor in the checkpoint (reads only safetensors headers)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from e
        if not isinstance(weight_map, dict):
            kind = type(weight_map).__name__
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard files, got a {kind}")
        bad = [f"{k!r}: {v!r}" for k, v in weight_map.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{index}: 'weight_map' entries without a shard file name, e.g. {bad[:_EXAMPLES]}")
        files = {name: path / name for name in set(weight_map.values())}
        missing = sorted(str(f) for f in files.values() if not f.is_file())
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        assigned: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            assigned.setdefault(name, []).append(key)
        for name, file in sorted(files.items()):  # every header readable and holding what the index puts there
            held = set(_shard_keys(file))
            absent = sorted(k for k in assigned[name] if k not in held)
            if absent:
                raise ValueError(f"{index}: {len(absent)} tensors it assigns to {name} are not in that file, "
                                 f"e.g. {absent[:_EXAMPLES]}")  # fmt: skip
        return {k: files[v] for k, v in weight_map.items()}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path}: no model.safetensors.index.json and no *.safetensors file")
    files: dict[str, Path] = {}
    for shard in shards:
        for key in _shard_keys(shard):
            if key in files:  # without an index nothing says which copy is meant
                raise ValueError(f"{path}: tensor {key!r} is in both {files[key].name} and {shard.name} and no "
                                 "model.safetensors.index.json says which to use; remove the stray file")  # fmt: skip
            files[key] = shard
    return files


def _shard_keys(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header, in its order."""
    handle = _open_shard(file)
    try:
        return list(handle.keys())
    finally:
        handle.__exit__(None, None, None)


@dataclass
class LoadReport:
    loaded: int = 0
    dequantized_fp8: int = 0
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """Build on the meta device (no memory), then allocate once on ``device`` in ``dtype`` (uninitialized)."""
    return _materialize(_meta_model(cfg, dtype), device)


def _meta_model(cfg: ModelConfig, dtype: torch.dtype) -> Transformer:
    with _default_dtype(dtype), torch.device("meta"):
        return Transformer(cfg)


def _materialize(model: Transformer, device: str | torch.device) -> Transformer:
    model.to_empty(device=device)
    if model.cfg.tie_word_embeddings:  # to_empty gives each module its own storage: tie the head again
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.reset_parameters()
    return model


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    missing_mtp: str = "drop",
    report: LoadReport | None = None,
) -> Transformer:
    """Load an HF-format DeepSeek-V3 checkpoint directory, streaming tensor by tensor.

    ``missing_mtp`` decides what happens when the config declares MTP layers the checkpoint lacks (transformers'
    ``save_pretrained`` drops them): ``"drop"`` builds the model without MTP, ``"init"`` initializes them
    randomly, ``"error"`` refuses. Either way the choice is recorded in ``report.notes`` and logged.

    Missing parameters, or main layers in the weights other than ``0..num_hidden_layers-1``, raise one
    ``ValueError`` before any memory is allocated, listing the missing and the unexpected keys and saying how the
    weights' layers differ from ``config.json``; unexpected keys alone (extra MTP layers, foreign tensors) are
    skipped with a warning, as are the rotary ``inv_freq`` buffers older checkpoints carry.
    """
    path = Path(path)
    report = report if report is not None else LoadReport()
    model, key_files, plan, zero_bias, init_mtp = _checked_plan(path, dtype, missing_mtp, report)
    _materialize(model, device)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    _load_tensors(path, key_files, plan, params, report)
    for name in zero_bias:
        params[name].zero_()
        report.notes.append(f"{name} missing: initialized to zeros")
    if init_mtp:
        _init_mtp(model)
    if report.ignored:
        log.warning("%s: ignored %d checkpoint tensors, e.g. %s", path, len(report.ignored), report.ignored[:4])
    model.generation_eos_token_ids = generation_eos_token_ids(path)
    return model


def generation_eos_token_ids(path: str | Path) -> frozenset[int]:
    """The ``eos_token_id`` (an id or a list) of the checkpoint's ``generation_config.json``, which ``generate`` in
    transformers stops at (a chat model lists its end-of-turn token there, often not in ``config.json``); empty
    without the file or the key. A file that does not parse is an error naming it."""
    gen = Path(path) / "generation_config.json"
    if not gen.is_file():
        return frozenset()
    try:
        eos = json.loads(gen.read_text()).get("eos_token_id")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{gen}: not a JSON object ({e})") from None
    ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{gen}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    return frozenset(ids)


def check_checkpoint(path: str | Path, missing_mtp: str = "drop", report: LoadReport | None = None) -> ModelConfig:
    """Everything ``load_checkpoint`` checks before it reads a tensor (``config.json``, every shard's header, the
    weights' keys and layers against the config), without loading any: for checks that run before a job starts.
    Returns the config the model would be built with; raises as ``load_checkpoint`` would. With a ``report``, what
    the loader would log (a missing-MTP decision) goes to ``report.notes`` only, for a caller that says it itself."""
    model, *_ = _checked_plan(Path(path), torch.float32, missing_mtp, report or LoadReport(), log_notes=report is None)
    generation_eos_token_ids(path)  # raises on a generation_config.json load_checkpoint would refuse
    return model.cfg


def _checked_plan(path: Path, dtype: torch.dtype, missing_mtp: str, report: LoadReport, log_notes: bool = True):
    """The meta-device model and the plan that fills it: (model, key_files, plan, zero_bias, init_mtp); raises
    on a missing directory, a bad ``config.json``, unreadable shard headers or weights that do not fit the config."""
    if missing_mtp not in _MISSING_MTP:
        raise ValueError(f"missing_mtp must be one of {_MISSING_MTP}, got {missing_mtp!r}")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = ModelConfig.from_hf(path)
    declared_mtp = cfg.num_nextn_predict_layers
    key_files = _checkpoint_files(path)
    main_layers, mtp_layers = _weight_layers(key_files)
    init_mtp = False
    if cfg.num_nextn_predict_layers and not mtp_layers:
        msg = f"{path}: config declares {cfg.num_nextn_predict_layers} MTP layer(s) but the checkpoint has none"
        if missing_mtp == "error":
            raise ValueError(msg)
        if missing_mtp == "drop":
            cfg = cfg.replace(num_nextn_predict_layers=0)
            msg += "; building the model without MTP (missing_mtp='init' trains fresh ones)"
        else:
            init_mtp = True
            msg += "; initializing them randomly"
        if log_notes:
            log.warning(msg)
        report.notes.append(msg)
    model = _meta_model(cfg, dtype)
    expected = _expected_fills(model)
    names = {name for name, _ in [*model.named_parameters(), *model.named_buffers()]}
    plan, ignored = _plan(key_files, cfg, names)
    report.ignored.extend(ignored)
    _check_shapes(path, key_files, plan, model)
    unfilled = _unfilled(plan, expected)
    zero_bias = [name for name in unfilled if name.endswith("e_score_correction_bias")]
    missing = [
        f"{name} ({have}/{expected[name]} pieces)"
        for name, have in unfilled.items()
        if name not in zero_bias and not (init_mtp and name.startswith("mtp."))
    ]
    n = cfg.num_hidden_layers
    main_agree = main_layers == set(range(n))
    mtp_agree = init_mtp or mtp_layers == set(range(n, n + cfg.num_nextn_predict_layers))
    if missing or not main_agree:
        unexpected = [k for k in ignored if not _IGNORED.search(k)]
        layers = None if main_agree and mtp_agree else _layer_mismatch(n, declared_mtp, main_layers, mtp_layers)
        raise ValueError(_mismatch_message(path, layers, missing, unexpected))
    return model, key_files, plan, zero_bias, init_mtp


_MISSING_MTP = ("drop", "init", "error")


def _weight_layers(key_files: dict[str, Path]) -> tuple[set[int], set[int]]:
    """Layer indices in the checkpoint: (main layers, MTP layers), an MTP layer being one with enorm/eh_proj keys."""
    layers, mtp = set(), set()
    for key in key_files:
        m = _LAYER_KEY.match(key)
        if m is not None:
            layers.add(int(m.group(1)))
            if m.group(2) in _MTP_MARK:
                mtp.add(int(m.group(1)))
    return layers - mtp, mtp


def _plan(key_files: dict[str, Path], cfg: ModelConfig, names: set[str]) -> tuple[list[tuple[str, Target]], list[str]]:
    """(key, target) for each tensor to load, in file order, and the keys nothing takes (sorted)."""
    plan, ignored = [], []
    for key in sorted(key_files, key=lambda k: (str(key_files[k]), k)):
        if key.endswith(".weight_scale_inv"):  # read with its FP8 weight
            continue
        target = hf_to_ours(key, cfg)
        if target is None or target.name not in names:
            ignored.append(key)
        elif target.expert is not None and target.expert >= cfg.n_routed_experts:
            raise ValueError(
                f"{key_files[key]}: {key} is routed expert {target.expert}, but config.json says "
                f"n_routed_experts={cfg.n_routed_experts} (experts 0-{cfg.n_routed_experts - 1})"
            )
        else:
            plan.append((key, target))
    return plan, sorted(ignored)


def _target_shape(param_shape: torch.Size, target: Target) -> tuple[int, ...]:
    """The shape a checkpoint tensor must have to fill ``target`` (``_assign``'s view of the parameter)."""
    if target.expert is None:
        return tuple(param_shape)
    shape = list(param_shape[1:])
    if target.part is not None:
        shape[0] //= 2
    return tuple(shape)


def _check_shapes(path: Path, key_files: dict[str, Path], plan: list[tuple[str, Target]], model: Transformer) -> None:
    """Every planned tensor's shape, read from its shard's header, against the parameter it fills: a config.json
    that does not match the weights fails here, before any tensor is read (``check_checkpoint``, preflight)."""
    shapes = dict(model.named_parameters())
    shapes.update(dict(model.named_buffers()))
    by_file: dict[Path, list[tuple[str, Target]]] = {}
    for key, target in plan:
        if not target.shared_copy:  # (a shared copy is compared with the main tensor after loading)
            by_file.setdefault(key_files[key], []).append((key, target))
    wrong = []
    for file, entries in by_file.items():
        handle = _open_shard(file)
        try:
            for key, target in entries:
                got = tuple(handle.get_slice(key).get_shape())
                want = _target_shape(shapes[target.name].shape, target)
                if got != want:
                    wrong.append(f"{key} has shape {got}, expected {want} for {target.name}")
        finally:
            handle.__exit__(None, None, None)
    if wrong:
        more = f" (and {len(wrong) - _EXAMPLES} more)" if len(wrong) > _EXAMPLES else ""
        raise ValueError(f"{path}: {len(wrong)} tensors do not fit config.json: {'; '.join(wrong[:_EXAMPLES])}{more}")


def _unfilled(plan: list[tuple[str, Target]], expected: dict[str, int]) -> dict[str, int]:
    """Parameters the plan does not fill completely -> pieces it does fill (a fused v5 expert tensor is all)."""
    filled: dict[str, int] = {}
    for _, target in plan:
        if target.shared_copy:
            continue
        whole = target.expert is None
        filled[target.name] = filled.get(target.name, 0) + (expected.get(target.name, 1) if whole else 1)
    return {name: filled.get(name, 0) for name, need in expected.items() if filled.get(name, 0) < need}


def _spans(indices: set[int]) -> str:
    """{0, 1, 2, 5} -> '0-2, 5'."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"


def _layer_mismatch(n_layers: int, n_mtp: int, main: set[int], mtp: set[int]) -> str:
    said = f"config.json says num_hidden_layers={n_layers} (+{n_mtp} MTP)"
    held = f"the weights hold layers {_spans(main | mtp)}"
    if mtp:
        held += f" ({len(main)} main: {_spans(main)}; MTP: {_spans(mtp)})"
    return f"{said} but {held}"


def _mismatch_message(path: Path, layers: str | None, missing: list[str], unexpected: list[str]) -> str:
    """One error with every side of a key mismatch: the layer counts, the missing and the unexpected keys."""
    parts = [layers] if layers else []
    if missing:
        parts.append(f"{len(missing)} model parameters missing from the checkpoint, e.g. {missing[:_EXAMPLES]}")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint tensors unexpected, e.g. {unexpected[:_EXAMPLES]}")
    return f"{path}: checkpoint does not match its config.json: " + "; ".join(parts)


def _load_tensors(
    path: Path, key_files: dict[str, Path], plan: list[tuple[str, Target]], params: dict, report: LoadReport
) -> None:
    """Copy the planned tensors into ``params``, one shard open at a time (so finished shards leave the RSS)."""
    current: dict[Path, object] = {}

    def get(key: str) -> torch.Tensor:
        file = key_files[key]
        if file not in current:
            for handle in current.values():
                handle.__exit__(None, None, None)
            current.clear()
            current[file] = _open_shard(file)
        return _read_tensor(current[file], file, key)

    shared_copies: list[tuple[str, Target]] = []
    try:
        for key, target in plan:
            if target.shared_copy:
                shared_copies.append((key, target))
                continue
            tensor = get(key)
            if tensor.dtype == torch.float8_e4m3fn:
                scale_key = key[: -len("weight")] + "weight_scale_inv"
                if scale_key not in key_files:
                    raise ValueError(f"{path}: FP8 tensor {key} has no {scale_key}")
                from dsalign.kernels.quant import dequantize_weight_blockwise

                scale_inv = get(scale_key).float()
                try:
                    tensor = dequantize_weight_blockwise(get(key), scale_inv)
                except ValueError as e:
                    raise ValueError(f"{key_files[scale_key]}: {scale_key}: {e}") from e
                report.dequantized_fp8 += 1
            _assign(params[target.name], target, tensor, key, path)
            del tensor
            report.loaded += 1
        for key, target in shared_copies:  # after the main embedding / head are in place
            _assign(params[target.name], target, get(key), key, path)
    finally:
        for handle in current.values():
            handle.__exit__(None, None, None)


def _expected_fills(model: Transformer) -> dict[str, int]:
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("rotary."):
            continue
        if name.endswith("experts.gate_up_proj"):
            out[name] = 2 * t.shape[0]
        elif name.endswith("experts.down_proj"):
            out[name] = t.shape[0]
        else:
            out[name] = 1
    if model.cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


@torch.no_grad()
def _assign(dst: torch.Tensor, target: Target, src: torch.Tensor, key: str, path: Path) -> None:
    if target.shared_copy:
        if dst.shape != src.shape or not torch.equal(dst, src.to(dst.dtype)):
            log.warning("%s: %s differs from the main model's %s; dsalign shares it", path, key, target.name)
        return
    if target.expert is not None:
        # Fused v5 keys land here too when present with a leading expert dim; per-expert keys fill one slice.
        view = dst[target.expert]
        if target.part is not None:
            inter = dst.shape[1] // 2
            view = view[:inter] if target.part == "gate" else view[inter:]
    else:
        view = dst
    if view.shape != src.shape:
        raise ValueError(f"{path}: {key} has shape {tuple(src.shape)}, expected {tuple(view.shape)} for {target.name}")
    view.copy_(src)


@torch.no_grad()
def _init_mtp(model: Transformer) -> None:
    std = model.cfg.initializer_range
    for name, p in model.mtp.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std)
    for m in model.mtp:
        if hasattr(m.block.mlp, "gate"):
            m.block.mlp.gate.e_score_correction_bias.zero_()


# ---------------------------------------------------------------------------------------------------- writing
def save_checkpoint(
    model: Transformer,
    path: str | Path,
    max_shard_bytes: int = 5 * 1024**3,
    fp8: bool = False,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the official HF layout atomically: everything goes to a temp dir beside ``path``, renamed at the end.

    ``fp8=True`` stores linear weights as e4m3 with 128x128 ``weight_scale_inv`` and adds ``quantization_config``.
    ``write_extra(tmp_dir)`` may add files (tokenizer, generation config) before the rename. Saving over an existing
    directory keeps the files of it this save does not write (``_keep_other_files``); temp directories of killed
    saves to ``path`` on this host are removed first.
    """
    path = Path(path)
    adapters = [n for n, _ in model.named_parameters() if ".lora_" in n or ".base_layer." in n]
    if adapters:  # their keys are not the official layout: transformers would initialize those weights randomly
        raise ValueError(f"the model carries unmerged LoRA adapters ({len(adapters)} parameters, e.g. {adapters[0]}); "
                         "save it with dsalign.alignment.trainer.lora.export_merged (or merge_lora first)")  # fmt: skip
    if model.cfg.moe_layer_freq != 1:
        log.warning("%s: moe_layer_freq=%d: dsalign reads it back, transformers' DeepseekV3 ignores it (it makes every "
                    "layer from first_k_dense_replace on MoE and would initialize the missing experts randomly)",
                    path, model.cfg.moe_layer_freq)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_saves(path)
    tmp = path.parent / f".{path.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_tensors(model, tmp, max_shard_bytes, fp8)
        cfg = model.cfg
        hf = cfg.to_hf()
        dtype = next(model.parameters()).dtype
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        hf.pop("quantization_config", None)  # a model loaded from FP8 weights holds them dequantized
        if fp8:
            hf["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [128, 128],
            }
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if write_extra is not None:
            write_extra(tmp)
        _keep_other_files(path, tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_tensors(model: Transformer, out_dir: Path, max_shard_bytes: int, fp8: bool) -> None:
    entries = list(ours_to_hf(model))
    elem = {torch.float8_e4m3fn: 1}
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in entries:
        key, _, shape, dtype = entry
        quant = fp8 and _fp8_quantizable(key, shape)
        nbytes = shape.numel() * (1 if quant else elem.get(dtype, torch.empty(0, dtype=dtype).element_size()))
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((entry, quant))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for (key, make, _, _), quant in shard:
            t = make().detach().cpu()
            if quant:
                from dsalign.kernels.quant import quantize_weight_blockwise

                w8, scale_inv = quantize_weight_blockwise(t.float())
                tensors[key] = w8
                tensors[key[: -len("weight")] + "weight_scale_inv"] = scale_inv
            else:
                tensors[key] = t.contiguous()
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


_HOST = socket.gethostname()
_WEIGHT_FILES = re.compile(r"(.*\.safetensors|model\.safetensors\.index\.json|config\.json)$")


def _remove_dead_saves(path: Path) -> None:
    """Temp directories that killed saves to ``path`` left beside it (``.NAME.tmp-HOST-PID-ID``): those of this
    host whose process is gone (another host's, on a shared filesystem, may still be writing)."""
    prefix = f".{path.name}.tmp-{_HOST}-"
    for stale in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = stale.name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _keep_other_files(path: Path, tmp: Path) -> None:
    """Saving over an existing checkpoint directory keeps what the save does not write there (tokenizer, chat
    template, generation config, a README), as transformers' ``save_pretrained`` into a directory does; the old
    weights, index and config.json are replaced."""
    if not path.is_dir():
        return
    for item in path.iterdir():
        if (tmp / item.name).exists() or _WEIGHT_FILES.fullmatch(item.name):
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / item.name, symlinks=True)
        else:
            shutil.copy2(item, tmp / item.name, follow_symlinks=False)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Swap ``tmp`` into ``path``; an existing ``path`` is moved aside first and deleted only after the swap, and
    moved back if the swap fails. (A kill between the two renames leaves it at ``.NAME.old-*`` beside ``path``.)"""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
