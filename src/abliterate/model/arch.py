"""Everything abliterate knows about model layouts lives here.

A decoder-only transformer keeps a residual stream that only a few modules write
to: the token (and, for GPT-2, position) embeddings, and in every block the
attention output and the MLP output. To remove a direction from the stream we
must find *every* writer; a writer missed is a direction left in, so nothing here
is optional unless the spec says so and the resolver checks that each block still
has at least one writer of each kind.

Paths are explicit per family (no probing with try/except). A model of another
family can be described with an `ArchSpec` passed as `spec=` (API) or as a JSON
file with `--arch-spec` (CLI).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import AbliterateError


@dataclass(frozen=True)
class ArchSpec:
    """Where the residual-stream writers of one model family live.

    Paths are dotted attribute paths. `layers` is from the model root; the block
    paths are relative to one decoder block. A path ending in "?" may be absent
    in some blocks (dense vs MoE blocks, shared experts), but every block must
    have at least one attention writer and one MLP writer.
    """

    layers: str  # the nn.ModuleList of decoder blocks
    embeddings: tuple[str, ...]  # modules whose output starts the residual stream
    attn_writers: tuple[str, ...]  # Linear / Conv1D / fused-expert parameters
    mlp_writers: tuple[str, ...]
    attn_hook: str  # module whose output is what the attention adds to the stream
    mlp_hook: str
    # Gemma 2/3 normalise the attention and MLP outputs before adding them
    # (RMSNorm with scale `1 + weight`); such writers are edited against the
    # direction seen through that norm's scale.
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    norm_offset: float = 0.0
    lm_head: str = "lm_head"
    # How a constant addition to the stream can be stored as a bias (steer.bake_steering):
    # "native" (the MLP output already has one), "mlp_bias" (the config can switch MLP
    # biases on), "as_llama" (the network is a Llama with extra biases and can be saved
    # as one), or None with the reason in `steer_bias_why`.
    steer_bias: str | None = None
    steer_bias_why: str = "no entry for this architecture"
    # llama.cpp's name for the family (GGUF `general.architecture`), for GGUF files we write.
    gguf_arch: str | None = None

    @classmethod
    def from_json(cls, path: str | Path) -> "ArchSpec":
        try:
            raw = json.loads(Path(path).read_text())
            for key in ("embeddings", "attn_writers", "mlp_writers"):
                raw[key] = tuple(raw[key])
            return cls(**raw)
        except (OSError, ValueError, TypeError, KeyError, RecursionError) as e:
            raise AbliterateError(
                f"architecture spec {path!s} is not usable ({e}); it must be a JSON object with "
                f"the fields of abliterate.arch.ArchSpec: {', '.join(ArchSpec.__dataclass_fields__)}"
            ) from e


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    attn_writers=("self_attn.o_proj",),
    mlp_writers=("mlp.down_proj",),
    attn_hook="self_attn.o_proj",
    mlp_hook="mlp.down_proj",
)
_LLAMA = replace(_LLAMA_LIKE, steer_bias="mlp_bias")

_GEMMA = ArchSpec(
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    attn_writers=("self_attn.o_proj",),
    mlp_writers=("mlp.down_proj",),
    attn_hook="post_attention_layernorm",
    mlp_hook="post_feedforward_layernorm",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    norm_offset=1.0,
    steer_bias_why="a bias before Gemma's post-MLP norm is rescaled per token, so it is not a constant addition",
)

# Keyed by config.model_type. Qwen2 is Llama with q/k/v biases; Mistral and Phi-3
# (fused qkv and gate_up, but plain o_proj / down_proj) write like Llama.
SPECS: dict[str, ArchSpec] = {
    "llama": replace(_LLAMA, gguf_arch="llama"),
    "mistral": replace(_LLAMA_LIKE, steer_bias="as_llama", gguf_arch="llama"),  # llama.cpp runs Mistral as Llama
    "qwen2": replace(_LLAMA_LIKE, steer_bias="as_llama", gguf_arch="qwen2"),
    "qwen3": replace(_LLAMA_LIKE, gguf_arch="qwen3",
                     steer_bias_why="Qwen3 normalises queries and keys, which no biased config "
                     "of another family expresses, and its own config has no MLP-bias switch"),
    "phi3": replace(_LLAMA_LIKE, gguf_arch="phi3", steer_bias_why="Phi-3's config has no MLP-bias switch"),
    # transformers fuses MoE experts into one (experts, hidden, intermediate)
    # parameter; some blocks may be dense (mlp_only_layers), some have a shared expert.
    "qwen3_moe": ArchSpec(
        layers="model.layers",
        embeddings=("model.embed_tokens",),
        attn_writers=("self_attn.o_proj",),
        mlp_writers=("mlp.experts.down_proj?", "mlp.down_proj?"),
        attn_hook="self_attn.o_proj",
        mlp_hook="mlp",
        steer_bias_why="fused experts have no output bias and the config has no switch for one",
        gguf_arch="qwen3moe",
    ),
    "qwen2_moe": ArchSpec(
        layers="model.layers",
        embeddings=("model.embed_tokens",),
        attn_writers=("self_attn.o_proj",),
        mlp_writers=("mlp.experts.down_proj?", "mlp.shared_expert.down_proj?", "mlp.down_proj?"),
        attn_hook="self_attn.o_proj",
        mlp_hook="mlp",
        steer_bias_why="fused experts have no output bias and the config has no switch for one",
        gguf_arch="qwen2moe",
    ),
    "gemma2": replace(_GEMMA, gguf_arch="gemma2"),
    "gemma3_text": replace(_GEMMA, gguf_arch="gemma3"),
    # Gemma 3 image-text: the language model sits one level down.
    "gemma3": ArchSpec(**{
        **asdict(_GEMMA),
        "gguf_arch": "gemma3",
        "layers": "model.language_model.layers",
        "embeddings": ("model.language_model.embed_tokens",),
    }),
    # GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear.
    "gpt2": ArchSpec(
        layers="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        attn_writers=("attn.c_proj",),
        mlp_writers=("mlp.c_proj",),
        attn_hook="attn.c_proj",
        mlp_hook="mlp.c_proj",
        steer_bias="native",
        gguf_arch="gpt2",
    ),
}


@dataclass
class Writer:
    """One parameter whose output rows land in the residual stream.

    `out_dim` is the axis of `param` that indexes residual features, so the
    edit of any layout is the same line of algebra along that axis.
    """

    name: str
    param: nn.Parameter
    out_dim: int


@dataclass
class Block:
    """The writers of one decoder block, grouped by what they belong to."""

    index: int
    module: nn.Module
    attn: list[Writer]
    mlp: list[Writer]
    attn_hook: nn.Module
    mlp_hook: nn.Module
    attn_scale: torch.Tensor | None = None  # effective post-norm scale, (H,)
    mlp_scale: torch.Tensor | None = None


@dataclass
class Layout:
    """The resolved writers of one model instance."""

    spec: ArchSpec
    hidden_size: int
    embeddings: list[Writer]
    embedding_modules: list[nn.Module]
    blocks: list[Block] = field(default_factory=list)
    lm_head: nn.Module | None = None

    @property
    def n_layers(self) -> int:
        return len(self.blocks)


def check_layer(layer: int, n_layers: int) -> int:
    """`layer` if it indexes one of `n_layers` blocks; else the error every command gives."""
    if not 0 <= layer < n_layers:
        raise AbliterateError(f"layer {layer} is out of range; this model has layers 0..{n_layers - 1}")
    return layer


def model_type(model: nn.Module) -> str:
    return getattr(model.config, "model_type", type(model).__name__)


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def sliding_window(model) -> int | None:
    """The attention window of `model`'s sliding-window layers (Gemma 2/3, Mistral), or None when it has none.

    A shared prefix's cache with each row's padding after it puts the padding inside the sequence, where a
    sliding window counts it as tokens: `cached_logits` runs such rows whole (left-padded) once the padded
    sequence is longer than the window. (`measure.decode.greedy` shares a prefix the same way; its prompts and
    answers are far shorter than the real models' windows, 512 tokens and more, and it was left as it is.)"""
    if getattr(model, "config", None) is None:
        return None
    config = text_config(model)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    return int(window) if types is None or "sliding_attention" in types else None


def spec_for(model: nn.Module, spec: ArchSpec | None = None) -> ArchSpec:
    if spec is not None:
        return spec
    mtype = model_type(model)
    if mtype not in SPECS:
        raise AbliterateError(
            f"architecture {mtype!r} ({type(model).__name__}) is not supported; supported: "
            f"{', '.join(sorted(SPECS))}. Describe its residual writers with --arch-spec FILE.json "
            f"(API: spec=abliterate.ArchSpec(...))"
        )
    return SPECS[mtype]


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _writers(owner: nn.Module, path: str, prefix: str, hidden: int) -> list[Writer]:
    """The parameters of the module or parameter at `path` that write `hidden` features."""
    obj = _get(owner, path)
    if obj is None:
        return []
    name = f"{prefix}.{path}" if prefix else path
    if isinstance(obj, nn.Parameter):
        # Fused experts: (experts, hidden, intermediate), used as F.linear per expert.
        if obj.dim() != 3 or obj.shape[1] != hidden:
            raise AbliterateError(
                f"{name} has shape {tuple(obj.shape)}; expected fused experts (experts, {hidden}, "
                f"intermediate). Fix the path in --arch-spec"
            )
        return [Writer(name, obj, 1)]
    if isinstance(obj, nn.Embedding):
        return [Writer(f"{name}.weight", obj.weight, 1)]
    if isinstance(obj, nn.Linear):
        found = [Writer(f"{name}.weight", obj.weight, 0)]
    elif type(obj).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight (in, out)
        found = [Writer(f"{name}.weight", obj.weight, 1)]
    else:
        raise AbliterateError(
            f"{name} is a {type(obj).__name__}; abliterate can edit Linear, Conv1D, Embedding and "
            f"fused expert parameters. Point --arch-spec at the projection inside it"
        )
    if obj.bias is not None:
        found.append(Writer(f"{name}.bias", obj.bias, 0))
    for w in found:
        if w.param.shape[w.out_dim] != hidden:
            raise AbliterateError(
                f"{w.name} has shape {tuple(w.param.shape)}, which does not write the hidden size "
                f"{hidden}; fix the path in --arch-spec"
            )
    return found


def _group(block: nn.Module, paths: tuple[str, ...], prefix: str, hidden: int, what: str) -> list[Writer]:
    found: list[Writer] = []
    for path in paths:
        optional = path.endswith("?")
        path = path.rstrip("?")
        got = _writers(block, path, prefix, hidden)
        if not got and not optional:
            raise AbliterateError(
                f"{prefix}.{path} not found: this block's {what} output cannot be edited. "
                f"Fix the path with --arch-spec"
            )
        found += got
    if not found:
        raise AbliterateError(
            f"{prefix} has none of the {what} writers {list(paths)}; describe it with --arch-spec"
        )
    return found


def resolve(model: nn.Module, spec: ArchSpec | None = None) -> Layout:
    """Find every residual writer of `model`, or raise naming what is missing."""
    spec = spec_for(model, spec)
    hidden = text_config(model).hidden_size
    layers = _get(model, spec.layers)
    if not isinstance(layers, nn.ModuleList):
        raise AbliterateError(
            f"{spec.layers} is not a list of decoder blocks in {type(model).__name__}; "
            f"fix `layers` with --arch-spec"
        )
    embeddings, embedding_modules = [], []
    for path in spec.embeddings:
        module = _get(model, path)
        if not isinstance(module, nn.Embedding):
            raise AbliterateError(f"{path} is not an embedding in {type(model).__name__}; fix it with --arch-spec")
        embeddings += _writers(model, path, "", hidden)
        embedding_modules.append(module)
    layout = Layout(spec, hidden, embeddings, embedding_modules, lm_head=_get(model, spec.lm_head))
    for i, block in enumerate(layers):
        prefix = f"{spec.layers}.{i}"
        hooks = {}
        for key in ("attn_hook", "mlp_hook"):
            hooks[key] = _get(block, getattr(spec, key))
            if hooks[key] is None:
                raise AbliterateError(f"{prefix}.{getattr(spec, key)} not found; fix `{key}` with --arch-spec")
        scales = {}
        for key in ("attn_post_norm", "mlp_post_norm"):
            path = getattr(spec, key)
            norm = _get(block, path) if path else None
            if path and getattr(norm, "weight", None) is None:
                raise AbliterateError(f"{prefix}.{path} has no weight; fix `{key}` with --arch-spec")
            scales[key] = None if norm is None else norm.weight.detach().float() + spec.norm_offset
        layout.blocks.append(Block(
            index=i,
            module=block,
            attn=_group(block, spec.attn_writers, prefix, hidden, "attention"),
            mlp=_group(block, spec.mlp_writers, prefix, hidden, "MLP"),
            attn_hook=hooks["attn_hook"],
            mlp_hook=hooks["mlp_hook"],
            attn_scale=scales["attn_post_norm"],
            mlp_scale=scales["mlp_post_norm"],
        ))
    n_expected = getattr(text_config(model), "num_hidden_layers", None)
    if n_expected is not None and n_expected != layout.n_layers:
        raise AbliterateError(
            f"found {layout.n_layers} blocks at {spec.layers} but the config says {n_expected}; "
            f"fix `layers` with --arch-spec"
        )
    return layout
