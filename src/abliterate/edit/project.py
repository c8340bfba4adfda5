"""Remove a direction from the residual stream: with hooks (reversible) or in the weights.

Both act on the same writers (`arch.resolve`). Projecting a writer's output,
`y - (y.r) r`, is exactly what orthogonalizing its weights does, `W' = (I - r r^T) W`,
so hooks and baked weights give the same logits. Gemma 2/3 are the exception:
there the writer's output passes through an RMSNorm with scale g before joining
the stream. The hook projects the normalised output; the weights are
orthogonalised against u = normalize(g * r), which zeroes the component where it
enters the stream (r . (g * z / rms) = 0 <=> u . z = 0) but changes the norm's rms,
so the two are different interventions with the same invariant.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..find.directions import Direction
from ..model.arch import Layout, check_layer, resolve, text_config
from ..model.forward import first_param, input_device
from .weighted import Ablation, ablating, apply_ablation_


def plain(direction: Direction, n_layers: int) -> Ablation:
    """Plain abliteration as a weighted ablation: `direction` removed from every writer with weight 1."""
    r = direction.vector.float().unsqueeze(0)  # (1, H)
    ones = torch.ones(n_layers)
    return Ablation(r.expand(n_layers, -1, -1).contiguous(), ones, ones.clone(), r.clone(), embed=1.0)


@contextmanager
def ablated(model: nn.Module, direction: Direction, layout: Layout | None = None):
    """Within the block, `model` runs with `direction` projected out of every residual writer.

    Nothing is changed in the weights; the hooks are removed on exit, also on error.
    """
    layout = layout or resolve(model)
    direction.check_model(layout.hidden_size, layout.n_layers)
    with ablating(model, plain(direction, layout.n_layers), layout):
        yield model


@contextmanager
def added(model: nn.Module, vector: torch.Tensor, layer: int, layout: Layout | None = None):
    """Within the block, `vector` is added to the residual stream entering block `layer`, at every position."""
    layout = layout or resolve(model)
    check_layer(layer, layout.n_layers)
    param = first_param(model)
    v = vector.to(input_device(model), param.dtype)

    def pre_hook(module, args, kwargs):  # on the block's device (a device-mapped model's blocks sit on several)
        if args:
            return (args[0] + v.to(args[0].device),) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + v.to(kwargs["hidden_states"].device)}

    handle = layout.blocks[layer].module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def orthogonalize_(model: nn.Module, direction: Direction, layout: Layout | None = None) -> list[str]:
    """In place: orthogonalize every residual writer of `model` against `direction`.

    Embeddings (after untying a shared output head), attention outputs, MLP and
    expert down projections, and their biases. Returns the names edited.
    """
    layout = layout or resolve(model)
    direction.check_model(layout.hidden_size, layout.n_layers)
    return apply_ablation_(model, plain(direction, layout.n_layers), layout)


@torch.inference_mode()
def residual_component(model: nn.Module, tokenizer, direction: Direction, text: str = "Hello, how are you?") -> float:
    """Largest |h . r| / |h| over the residual stream entering every block, on `text`.

    After a complete orthogonalization this is at rounding level; a writer that
    was missed shows up here, so the pipeline checks it instead of trusting the spec.
    """
    n_layers = text_config(model).num_hidden_layers
    enc = tokenizer(text, return_tensors="pt").to(input_device(model))
    out = model(**enc, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    r = direction.vector.float()
    worst = 0.0
    for h in out.hidden_states[:n_layers]:  # each on its block's device (several, for a device-mapped model)
        h = h.float().cpu()
        ratio = ((h @ r).abs() / h.norm(dim=-1).clamp_min(1e-6)).max().item()
        worst = max(worst, ratio)
    return worst
