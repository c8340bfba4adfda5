"""Add a direction instead of removing it: activation addition, reversible or baked into a bias.

Strength is measured in units of the direction's own mean difference: strength 1
adds `direction.scale * direction.vector`, which moves the mean activation of the
harmless (or "negative") prompts onto the mean of the harmful ("positive") ones at
that layer. Negative strength subtracts; 0 is exactly the identity.

Baking: adding v to the stream entering block L is the same as adding v as a bias
to the last writer of block L-1 (its MLP down projection), since the residual
stream is a sum. That needs a bias the architecture can store; see
`arch.ArchSpec.steer_bias` for how each family does it, and why some cannot.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ..errors import AbliterateError
from ..find.directions import Direction
from ..model.arch import Layout, check_layer, resolve, text_config
from ..model.forward import first_param
from .project import added

MAX_LAYER = 4096  # far above any model's depth; a typo such as 0-99999999 fails here, not in memory


@dataclass(frozen=True)
class Steering:
    direction: Direction
    strength: float
    layers: tuple[int, ...]

    def vector(self) -> torch.Tensor:
        return self.direction.vector * (self.direction.scale * self.strength)

    def check(self, layout: Layout) -> "Steering":
        if not math.isfinite(self.strength):
            raise AbliterateError(f"strength {self.strength} is not a finite number; use e.g. 1.0 or -0.5")
        if self.direction.hidden_size != layout.hidden_size:
            raise AbliterateError(
                f"direction has {self.direction.hidden_size} features but the model's hidden size is "
                f"{layout.hidden_size}; it was made for another model ({self.direction.meta.get('model', '?')})"
            )
        if not self.layers:
            raise AbliterateError("no layers to steer; give --layers, e.g. --layers 10 or --layers 8-12")
        for layer in self.layers:
            check_layer(layer, layout.n_layers)
        return self


def parse_layers(text: str) -> tuple[int, ...]:
    """'10', '8,9,12' or '8-12' (inclusive)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            lo, hi = int(lo), int(hi) if hi else int(lo)
            if lo < 0 or hi > MAX_LAYER:
                raise ValueError(f"layers are numbered 0 to at most {MAX_LAYER}")
            if hi < lo:
                raise ValueError(f"the range {lo}-{hi} runs backwards; write {hi}-{lo}")
            out += range(lo, hi + 1)
    except ValueError as e:
        raise AbliterateError(f"--layers {text!r} is not a layer list ({e}); use e.g. 10, 8,9,12 or 8-12") from e
    if not out:
        raise AbliterateError(f"--layers {text!r} names no layer; use e.g. 10, 8,9,12 or 8-12")
    return tuple(dict.fromkeys(out))


@contextmanager
def steered(model: nn.Module, steering: Steering, layout: Layout | None = None):
    """Within the block, the steering vector is added to the stream entering each of its layers."""
    layout = layout or resolve(model)
    steering.check(layout)
    v = steering.vector()
    with ExitStack() as stack:
        for layer in steering.layers:
            stack.enter_context(added(model, v, layer, layout))
        yield model


def _zero_bias_(linear: nn.Linear) -> None:
    if linear.bias is None:
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)


def _as_llama(model: nn.Module) -> nn.Module:
    """The same network as a Llama with attention and MLP biases (Qwen2 = Llama + q/k/v biases)."""

    src = text_config(model)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim")
    fields = {k: getattr(src, k) for k in keep if getattr(src, k, None) is not None}
    config = LlamaConfig(**fields, attention_bias=True, mlp_bias=True)
    if getattr(src, "sliding_window", None) and getattr(src, "use_sliding_window", True):
        raise AbliterateError("this model uses sliding-window attention, which a Llama config cannot express")
    param = first_param(model)
    llama = LlamaForCausalLM(config).to(param.device, param.dtype).eval().requires_grad_(False)
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise AbliterateError(f"cannot re-express {type(model).__name__} as Llama (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if name in missing:
                p.zero_()
    llama.generation_config = model.generation_config
    return llama


@torch.no_grad()
def bake_steering(model: nn.Module, steering: Steering, layout: Layout | None = None) -> nn.Module:
    """A model that adds the steering vector with no hooks: as a bias on block L-1's MLP output.

    Returns `model` edited in place, or a re-expressed copy (Qwen2 and Mistral become
    Llama configs with zero biases), per the family's `steer_bias` entry.
    """
    layout = layout or resolve(model)
    steering.check(layout)
    how = layout.spec.steer_bias
    if how is None:
        raise AbliterateError(
            f"{text_config(model).model_type} cannot store a steering bias: {layout.spec.steer_bias_why}. "
            f"Steer with hooks (abliterate steer without -o) instead"
        )
    if 0 in steering.layers:
        raise AbliterateError("layer 0 has no block before it to carry a bias; steer layers 1 and up")
    if how == "as_llama":
        model = _as_llama(model)
        layout = resolve(model)
        how = layout.spec.steer_bias
    if how == "mlp_bias":
        for block in layout.blocks:
            for child in block.module.mlp.children():
                if isinstance(child, nn.Linear):
                    _zero_bias_(child)
        text_config(model).mlp_bias = True
        layout = resolve(model)
    v = steering.vector()
    for layer in steering.layers:
        bias = next((w for w in layout.blocks[layer - 1].mlp if w.name.endswith(".bias")), None)
        if bias is None:
            raise AbliterateError(f"block {layer - 1} has no MLP output bias to carry the steering vector")
        bias.param.add_(v.to(bias.param.device, bias.param.dtype))
    return model
