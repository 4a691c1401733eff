"""Adapter inference: the structure of a model that no adapter file describes, read from the loaded
module and its config.

- stacks: the lists of two or more blocks of one class under the base model (an encoder-decoder's
  are named encoder / decoder by their path; otherwise the one stack is the decoder of a causal LM,
  the encoder of anything else);
- FF projections in a block, by shape: `out` is the one linear map d_ff -> d_model (d_ff != d_model),
  `in` (and `gate`, for gated FFs) the maps d_model -> d_ff; Linear ([out, in]) or Conv1D ([in, out]);
- config keys by the values they hold (layer counts, heads, widths, positions).

A fused gate/up matrix (Phi-3 `gate_up_proj`, ModernBERT `Wi`) is one `in` projection of 2 d_ff
outputs; which half is the gate is found by a probe (`_fused_order`).

Refused with the reason: no repeated block list (ALBERT reuses one block), mixture-of-experts FFs, blocks that all share one FF, FF widths that differ between blocks, biases on some
projections only, and anything where the shapes leave more than one reading."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from .adapter import INFERENCE, Adapter, _config_value, modality

ADAPTER_HELP = (
    "Write the structure as a JSON adapter (`ffmerge-onnx inspect MODEL --adapter-out FILE` gives the "
    "inferred one as a start; the reviewed files in ffmerge_onnx/families/*.json are examples) and pass "
    "it with --adapter FILE."
)
HEADS = {"ForSequenceClassification": "text-classification"}
KEYS = {  # canonical name -> config keys tried, in order (transformers' attribute_map covers most aliases)
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "num_layers.encoder": ("encoder_layers", "num_layers", "num_hidden_layers"),
    "num_layers.decoder": ("decoder_layers", "num_decoder_layers", "num_hidden_layers"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "heads.encoder": ("encoder_attention_heads", "num_heads", "num_attention_heads"),
    "heads.decoder": ("decoder_attention_heads", "num_heads", "num_attention_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
    "d_model": ("hidden_size", "d_model", "n_embd", "dim"),
    "d_ff": ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "hidden_dim", "ffn_hidden_size", "4*hidden_size"),
    "d_ff.encoder": ("encoder_ffn_dim", "d_ff", "intermediate_size", "ffn_dim"),
    "d_ff.decoder": ("decoder_ffn_dim", "d_ff", "intermediate_size", "ffn_dim"),
    "activation": ("hidden_act", "activation_function", "hidden_activation", "dense_act_fn", "feed_forward_proj"),
    "max_positions": ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length"),
}
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _linear_layout(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # transformers' GPT-2 style
        return "conv1d"
    return None


def _shape(module: nn.Module, layout: str) -> tuple[int, int]:
    """(in features, out features)."""
    out_f, in_f = module.weight.shape
    return (in_f, out_f) if layout == "linear" else (out_f, in_f)


def _refuse(model_type: str, why: str, adapter_helps: bool = True) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"Model type {model_type!r}: {why}" + (f" {ADAPTER_HELP}" if adapter_helps else "")
    )


def _stacks(base: nn.Module) -> dict[str, nn.ModuleList]:
    """Qualified path -> ModuleList of two or more blocks of one class holding linear maps, outermost only."""
    found: dict[str, nn.ModuleList] = {}
    for path, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(b) for b in module}) != 1 or any(path.startswith(p + ".") for p in found):
            continue
        if any(_linear_layout(m) for m in module[0].modules()) and not any(
            path.split(".")[-1] == word for word in ("experts", "heads")
        ):
            found[path] = module
    return found


def _stack_name(path: str, task: str, count: int) -> str:
    if count == 1:
        return "decoder" if task == "causal-lm" else "encoder"
    for name in ("decoder", "encoder"):
        if name in path.split(".")[0] or f"{name}." in path or path.endswith(name) or f".{name}" in path:
            return name
    return path.replace(".", "_")


def family_task(config) -> str:
    """What the family's base model does, from the config and transformers' auto mappings."""
    from transformers.models.auto import modeling_auto as auto

    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False) and modality(config) == "spectrogram":  # Whisper-style
        return "speech-seq2seq"
    if getattr(config, "is_encoder_decoder", False) or model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq-lm"
    if modality(config) == "image":  # vision encoders (ViT-style patches)
        return "image-classification"
    if modality(config) == "audio":  # waveform encoders (wav2vec2-style conv feature encoder)
        return "audio-feature-extraction"
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "feature-extraction"
    if model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    return "feature-extraction"


def _projections(model_type: str, block: nn.Module, d_model: int):
    """({in, gate?, out} -> path in the block, layout, bias, d_ff, fused order or None) of one block's FF
    sublayer."""
    linear = [(p, m, _linear_layout(m)) for p, m in block.named_modules() if _linear_layout(m)]
    if any("expert" in p for p, _, _ in linear):
        raise _refuse(model_type, "its blocks hold mixture-of-experts FFs (several FFs chosen per token); merging "
                                  "them as one FF would be wrong.", adapter_helps=False)  # fmt: skip
    shapes = {p: _shape(m, lay) for p, m, lay in linear}
    outs = [p for p, (i, o) in shapes.items() if o == d_model and i != d_model]
    if len(outs) != 1:
        found = ", ".join(f"{p} {i}->{o}" for p, (i, o) in shapes.items())
        raise _refuse(model_type, f"found {len(outs)} projections from the FF width back to d_model={d_model} in a "
                                  f"block ({found}); expected exactly one.")  # fmt: skip
    d_ff = shapes[outs[0]][0]
    ins = [p for p, (i, o) in shapes.items() if i == d_model and o == d_ff]
    fused = [p for p, (i, o) in shapes.items() if i == d_model and o == 2 * d_ff and "att" not in p.lower()]
    modules = {p: m for p, m, _ in linear}
    if not ins and len(fused) == 1:  # gate and up in one matrix (Phi-3 gate_up_proj, ModernBERT Wi)
        roles = {"in": fused[0], "out": outs[0]}
        layout = _linear_layout(modules[fused[0]])
        if _linear_layout(modules[outs[0]]) != layout:
            raise _refuse(model_type, f"its FF projections {sorted(roles.values())} mix layouts.")
        order = _fused_order(model_type, block, fused[0], outs[0], layout, d_model)
        return roles, layout, getattr(modules[fused[0]], "bias", None) is not None, d_ff, order
    if len(ins) not in (1, 2):
        raise _refuse(model_type, f"found {len(ins)} projections d_model={d_model} -> d_ff={d_ff} in a block "
                                  f"({ins}); expected one, or two for a gated FF.")  # fmt: skip
    roles = {"out": outs[0]}
    if len(ins) == 2:  # the gate is the one named so, else the first declared (gate_proj/up_proj, wi_0/wi_1)
        gate = next((p for p in ins if "gate" in p.split(".")[-1]), ins[0])
        roles.update(gate=gate, **{"in": next(p for p in ins if p != gate)})
    else:
        roles["in"] = ins[0]
    layouts = {_linear_layout(modules[p]) for p in roles.values()}
    biases = {getattr(modules[p], "bias", None) is not None for p in roles.values()}
    if len(layouts) != 1 or len(biases) != 1:
        raise _refuse(model_type, f"its FF projections {sorted(roles.values())} mix layouts or biases.")
    return roles, layouts.pop(), biases.pop(), d_ff, None


def _fused_order(model_type: str, block: nn.Module, fused: str, out: str, layout: str, d_model: int) -> tuple[str, ...]:
    """Which half of a fused gate/up matrix is the gate (activated) and which the up (linear) part, by a
    probe on a copy of the FF module: scaling the up half's rows by -2 scales the FF's hidden units by -2
    exactly; scaling the gate half does not (ReLU, GELU, SiLU, tanh alike)."""
    import copy

    parent = ".".join(p for p, q in zip(fused.split("."), out.split(".")) if p == q)
    if not parent or parent != fused.rpartition(".")[0] or parent != out.rpartition(".")[0]:
        raise _refuse(model_type, f"its fused gate/up matrix {fused} and output projection {out} are not in one FF "
                                  "module; cannot tell which half is the gate.")  # fmt: skip
    module = copy.deepcopy(block.get_submodule(parent)).eval()
    if any(p.is_meta for p in module.parameters()):  # a config-only model: random weights on a CPU copy
        module = module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.5)
    module = module.float()
    w = module.get_submodule(fused.rpartition(".")[2]).weight
    b = getattr(module.get_submodule(fused.rpartition(".")[2]), "bias", None)
    half = (w.shape[0] if layout == "linear" else w.shape[1]) // 2
    seen = []
    hook = module.get_submodule(out.rpartition(".")[2]).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    linear_halves = []
    try:
        x = torch.randn(1, 3, d_model, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            module(x)
            for k in range(2):
                rows = slice(k * half, (k + 1) * half)
                saved = (w.detach().clone(), None if b is None else b.detach().clone())
                (w[rows] if layout == "linear" else w[:, rows]).mul_(-2)
                if b is not None:
                    b[rows].mul_(-2)
                module(x)
                w.copy_(saved[0])
                if b is not None:
                    b.copy_(saved[1])
                if torch.allclose(seen[-1], -2 * seen[0], rtol=1e-4, atol=1e-6 * float(seen[0].abs().max())):
                    linear_halves.append(k)
    except Exception as e:  # an FF module this probe cannot call
        raise _refuse(model_type, f"could not run its FF module {parent} to tell which half of {fused} is the gate "
                                  f"({type(e).__name__}).") from e  # fmt: skip
    finally:
        hook.remove()
    if len(linear_halves) != 1 or not seen[0].abs().max() > 0:
        raise _refuse(model_type, f"cannot tell which half of the fused matrix {fused} is the gate (the FF is "
                                  f"linear in {len(linear_halves)} of its halves).")  # fmt: skip
    return ("gate", "in") if linear_halves[0] == 1 else ("in", "gate")


def _key(config, names: tuple[str, ...], value=None) -> str | None:
    """The first key in `names` the config holds (holding `value`, if given)."""
    for name in names:
        held = _config_value(config, name)
        if held is not None and (value is None or held == value):
            return name
    return None


def _position_offset(base: nn.Module) -> int:
    """Positions a RoBERTa-style embedding reserves: its padding index + 1."""
    for path, module in base.named_modules():
        if path.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            return int(module.padding_idx) + 1
    return 0


def _extra_tokens(base: nn.Module, config, task: str) -> int:
    """Tokens an image adds beyond its patches (CLS, distillation): read off the position table's length,
    else the learned [1, 1, d] tokens (masks aside)."""
    if task != "image-classification":
        return 0
    patches = (config.image_size // config.patch_size) ** 2
    for name, p in base.named_parameters():
        if "position" in name and p.dim() in (2, 3) and patches <= p.shape[-2] <= patches + 4:
            return int(p.shape[-2]) - patches
    return sum(
        1
        for name, p in base.named_parameters()
        if p.dim() == 3 and tuple(p.shape[:2]) == (1, 1) and "token" in name and "mask" not in name
    )


def _probe_cache(model: nn.Module) -> tuple[int, int] | None:
    """(key/value heads, head dim) a causal LM really caches, from one two-token step: configs can say
    otherwise (Falcon's multi-query attention keeps one head whatever num_kv_heads says)."""
    if any(p.is_meta for p in model.parameters()):
        return None
    try:
        with torch.no_grad():
            out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
        cache = out.get("cache")
        cache = out.get("past_key_values") if cache is None else cache
        key = cache.layers[0].keys if hasattr(cache, "layers") else cache[0][0]
        return int(key.shape[1]), int(key.shape[-1])
    except Exception:  # noqa: BLE001 - a model this probe cannot drive keeps what its config says
        return None


def _block_lists(
    model_type: str, model: nn.Module, base: nn.Module, task: str
) -> tuple[dict[str, nn.ModuleList], bool]:
    """The stacks to merge in (path -> blocks) and whether they are stages (Swin), or the refusal that says why
    there are none."""
    if any((_config_value(model.config, k) or 0) > 1 for k in ("num_experts", "num_local_experts", "moe_num_experts")):
        raise _refuse(model_type, "it is a mixture-of-experts model (several FFs chosen per token per layer).",
                      adapter_helps=False)  # fmt: skip
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input not in ("input_ids", "pixel_values", "input_values", "input_features") or (
        main_input == "input_features" and task != "speech-seq2seq"
    ):
        raise _refuse(model_type, f"it takes {main_input}; calibration, export and validation feed text, images, "
                                  "waveforms (input_values) and Whisper-style encoder-decoders only so far.",
                      adapter_helps=False)  # fmt: skip
    found = _stacks(base)
    if not found:
        raise _refuse(model_type, "found no list of two or more repeated blocks (a model that reuses one block for "
                                  "every layer, such as ALBERT, already shares its FF weights).", adapter_helps=False)  # fmt: skip
    nested = [p for p, blocks in found.items() if _stacks(blocks[0])]
    if nested:
        return _stages(model_type, nested[0], found[nested[0]]), True
    if len(found) > 2 or (len(found) == 2 and task not in ("seq2seq-lm", "speech-seq2seq")):
        raise _refuse(model_type, f"found several block lists ({', '.join(found)}); which to merge is ambiguous.")
    return found, False


def _stages(model_type: str, path: str, stages: nn.ModuleList) -> dict[str, nn.ModuleList]:
    """Swin-style stages (a list of blocks that each hold a block list of their own, widths changing between
    stages): every stage's inner list of two or more blocks is a stack of its own, `stage<i>`; a merge stays
    within a stage."""
    found = {}
    for i, stage in enumerate(stages):
        inner = _stacks(stage)
        if len(inner) > 1:
            raise _refuse(model_type, f"stage {path}.{i} holds several block lists ({', '.join(inner)}).")
        found.update({f"{path}.{i}.{p}": blocks for p, blocks in inner.items()})
    if not found:
        raise _refuse(model_type, f"its stages at {path} hold no list of two or more blocks.", adapter_helps=False)
    return found


def _stage_index(path: str) -> int | None:
    """i of a stage's inner list at `<stages>.<i>.<blocks>`, else None."""
    parts = path.split(".")
    return next((int(p) for p in reversed(parts[:-1]) if p.isdigit()), None)


def _stage_keys(config, i: int, layers: int, d_ff: int, model_type: str) -> dict:
    """Config keys of stage i: entries of list-valued keys (Swin's depths.i, num_heads.i); the FF width itself."""
    lists = {k: v for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) > i}
    depth = next((f"{k}.{i}" for k, v in lists.items() if "depth" in k and v[i] == layers), None)
    if depth is None:
        raise _refuse(model_type, f"no config list holds stage {i}'s layer count {layers}.")
    heads = next((f"{k}.{i}" for k in KEYS["heads"] if k in lists), None)
    return {"num_layers": depth, "heads": heads, "d_ff": d_ff}


def _width(block: nn.Module) -> int | None:
    """A block's model width, from its first LayerNorm (stages of one model differ in width)."""
    norm = next((m for m in block.modules() if isinstance(m, nn.LayerNorm)), None)
    return int(norm.normalized_shape[0]) if norm is not None else None


def _stack_keys(config, name: str, suffix: str, layers: int, d_ff: int, model_type: str) -> dict:
    """Config keys of one stack: its layer count, attention heads and FF width (the width itself if no key holds it)."""
    keys = {}
    for canonical, value in (("num_layers", layers), ("heads", None), ("d_ff", d_ff)):
        key = _key(config, KEYS.get(canonical + suffix, KEYS[canonical]), value)
        if key is None and canonical == "num_layers":
            raise _refuse(model_type, f"no config key holds its {name} layer count {layers}.")
        keys[canonical] = d_ff if key is None and canonical == "d_ff" else key
    return keys


def infer_adapter(model: nn.Module) -> Adapter:
    """An adapter for a loaded model from its structure (cached per model)."""
    if model in _cache:
        return _cache[model]
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    task = family_task(config)
    base = getattr(model, "base_model", model)
    found, staged = _block_lists(model_type, model, base, task)
    d_model = _config_value(config, "hidden_size|d_model|n_embd")
    if not isinstance(d_model, int):
        raise _refuse(model_type, "its config names no model width (hidden_size, d_model or n_embd).")
    stacks, paths, config_keys, found_roles = {}, {}, {}, {}
    layout = bias = fused = None
    widths = {}
    for path, blocks in found.items():
        name = f"stage{_stage_index(path)}" if staged else _stack_name(path, task, len(found))
        width = widths[name] = (_width(blocks[0]) or d_model) if staged else d_model
        roles, stack_layout, stack_bias, d_ff, stack_fused = _projections(model_type, blocks[0], width)
        if (
            (paths and set(roles) != set(paths))
            or layout not in (None, stack_layout)
            or bias not in (None, stack_bias)
            or (paths and fused != stack_fused)
        ):
            raise _refuse(model_type, "its stacks hold FFs of different structure (gated in one, layout or bias).")
        layout, bias, fused = stack_layout, stack_bias, stack_fused
        for proj, where in roles.items():  # each stack's path, in stack order (T5: layer.1 / layer.2)
            paths.setdefault(proj, [])
            if where not in paths[proj]:
                paths[proj].append(where)
        _check_blocks(model_type, name, blocks, roles, layout)
        stacks[name], found_roles[name] = (path,), roles
        suffix = f".{name}" if len(found) == 2 else ""
        keys = (_stage_keys(config, _stage_index(path), len(blocks), d_ff, model_type) if staged
                else _stack_keys(config, name, suffix, len(blocks), d_ff, model_type))  # fmt: skip
        for canonical, key in keys.items():
            config_keys.setdefault(canonical, {})[name] = key
    for canonical in ("kv_heads", "head_dim", "activation", "max_positions"):
        key = _key(config, KEYS[canonical])
        if key is not None:
            config_keys[canonical] = {n: key for n in stacks} if canonical in ("kv_heads", "head_dim") else key
    config_keys["d_model"] = widths if staged else _key(config, KEYS["d_model"], d_model)
    cached = _probe_cache(model) if task == "causal-lm" else None
    if cached is not None:
        config_keys["kv_heads"], config_keys["head_dim"] = ({n: v for n in stacks} for v in cached)
    adapter = Adapter(
        name=f"inferred:{model_type}",
        description=f"Inferred from the loaded {type(model).__name__}; review it with `ffmerge-onnx inspect`.",
        model_types=(model_type,),
        task=task,
        heads=dict(HEADS) if task == "feature-extraction" else {},
        stacks=stacks,
        projections={p: tuple(paths[p]) if p in paths else None for p in ("in", "gate", "out")},
        layout=layout,
        bias=bias,
        config_keys=config_keys,
        position_offset=_position_offset(base),
        extra_tokens=_extra_tokens(base, config, task),
        fused=fused,
    )
    for name, roles in found_roles.items():  # every stack's blocks resolve to their own projections
        block = adapter.layers(model, name)[0]
        if {p: adapter.projection_path(block, p) for p in roles} != roles:
            raise _refuse(model_type, f"the FF paths of one stack resolve to other modules in its {name} stack.")
    _cache[model] = adapter
    return adapter


def _check_blocks(model_type: str, stack: str, blocks: nn.ModuleList, roles: dict[str, str], layout: str) -> None:
    """Every block has the FF at the same paths with the same width, and the blocks do not all share one
    FF (a model that reuses one FF everywhere has nothing to merge; windows merged before are fine)."""
    weights, widths = set(), set()
    for i, block in enumerate(blocks):
        modules = dict(block.named_modules())
        for path in roles.values():
            module = modules.get(path)
            if module is None or _linear_layout(module) != layout:
                raise _refuse(model_type, f"{stack} block {i} has no FF projection at {path}; its blocks differ.")
        weights.add(id(modules[roles["out"]].weight))
        widths.add(_shape(modules[roles["out"]], layout)[0])
    if len(weights) == 1:
        raise _refuse(
            model_type,
            f"all its {stack} blocks already share one FF weight; there is nothing to merge.",
            adapter_helps=False,
        )
    if len(widths) > 1:
        raise _refuse(model_type, f"its {stack} blocks have FFs of different widths {sorted(widths)}; merged FFs must "
                                  "have one width.", adapter_helps=False)  # fmt: skip


def skeleton(config) -> nn.Module:
    """The model a config describes, on the meta device (no memory for weights)."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    else:
        cls = transformers.AutoModel._model_mapping[type(config)]
    with torch.device("meta"):
        return cls._from_config(config)


INFERENCE.update(model=infer_adapter, config=lambda config: infer_adapter(skeleton(config)))
