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
from tqdm.auto import tqdm

from .arch import Layout, Writer, check_layer, resolve, text_config
from .directions import Direction


def project_out(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x minus its component along the unit vector r, over the last axis."""
    return x - (x @ r).unsqueeze(-1) * r


def _on_output(fn):
    """A forward hook that applies `fn` to a module's output (or its first element)."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + output[1:]
        return fn(output)
    return hook


@contextmanager
def ablated(model: nn.Module, direction: Direction, layout: Layout | None = None):
    """Within the block, `model` runs with `direction` projected out of every residual writer.

    Nothing is changed in the weights; the hooks are removed on exit, also on error.
    """
    layout = layout or resolve(model)
    direction.check_model(layout.hidden_size, layout.n_layers)
    param = next(model.parameters())
    r = direction.vector.to(param.device, param.dtype)
    hook = _on_output(lambda y: project_out(y, r))
    modules = [*layout.embedding_modules]
    for block in layout.blocks:
        modules += [block.attn_hook, block.mlp_hook]
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@contextmanager
def added(model: nn.Module, vector: torch.Tensor, layer: int, layout: Layout | None = None):
    """Within the block, `vector` is added to the residual stream entering block `layer`, at every position."""
    layout = layout or resolve(model)
    check_layer(layer, layout.n_layers)
    param = next(model.parameters())
    v = vector.to(param.device, param.dtype)

    def pre_hook(module, args, kwargs):
        if args:
            return (args[0] + v,) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + v}

    handle = layout.blocks[layer].module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def _orthogonalize_(writer: Writer, u: torch.Tensor) -> None:
    """In place: remove u from the output axis of one weight. Computed in float32, cast at the write."""
    w = writer.param.data
    wm = w.movedim(writer.out_dim, -1).float()  # (..., H)
    wm = project_out(wm, u.to(wm.device))
    w.copy_(wm.movedim(-1, writer.out_dim).to(w.dtype))


def untie_lm_head_(model: nn.Module, layout: Layout) -> bool:
    """In place: give the output head its own copy of a tied embedding matrix.

    Editing the embedding must not edit the head: the head reads the stream,
    it does not write it.
    """
    head = layout.lm_head
    if head is None or not layout.embeddings:
        return False
    emb = layout.embeddings[0].param
    if head.weight.data_ptr() != emb.data_ptr():
        return False
    head.weight = nn.Parameter(emb.detach().clone(), requires_grad=False)
    for config in {id(model.config): model.config, id(text_config(model)): text_config(model)}.values():
        config.tie_word_embeddings = False
    return True


@torch.no_grad()
def orthogonalize_(model: nn.Module, direction: Direction, layout: Layout | None = None) -> list[str]:
    """In place: orthogonalize every residual writer of `model` against `direction`.

    Embeddings (after untying a shared output head), attention outputs, MLP and
    expert down projections, and their biases. Returns the names edited.
    """
    layout = layout or resolve(model)
    direction.check_model(layout.hidden_size, layout.n_layers)
    untie_lm_head_(model, layout)
    r = direction.vector.float()
    edited = []
    for w in layout.embeddings:
        _orthogonalize_(w, r)
        edited.append(w.name)
    for block in tqdm(layout.blocks, desc="orthogonalize", leave=False, unit="block"):
        for writers, scale in ((block.attn, block.attn_scale), (block.mlp, block.mlp_scale)):
            u = r if scale is None else nn.functional.normalize(r * scale.to(r.device), dim=0)
            for w in writers:
                _orthogonalize_(w, u)
                edited.append(w.name)
    return edited


@torch.inference_mode()
def residual_component(model: nn.Module, tokenizer, direction: Direction, text: str = "Hello, how are you?") -> float:
    """Largest |h . r| / |h| over the residual stream entering every block, on `text`.

    After a complete orthogonalization this is at rounding level; a writer that
    was missed shows up here, so the pipeline checks it instead of trusting the spec.
    """
    n_layers = text_config(model).num_hidden_layers
    param = next(model.parameters())
    enc = tokenizer(text, return_tensors="pt").to(param.device)
    out = model(**enc, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    r = direction.vector.to(param.device, torch.float32)
    worst = 0.0
    for h in out.hidden_states[:n_layers]:
        h = h.float()
        ratio = ((h @ r).abs() / h.norm(dim=-1).clamp_min(1e-6)).max().item()
        worst = max(worst, ratio)
    return worst
