"""The edit as a LoRA adapter: a few MB instead of a whole model, and reversible.

Orthogonalizing a writer W (out x in) against a unit u is a rank-one change,
W' = W - u (u^T W), so lora_B = -u and lora_A = u^T W with rank 1 and scale 1.
An embedding E (vocab x hidden) changes by -(E r) r^T, which PEFT stores
transposed: lora_embedding_B = -r, lora_embedding_A = (E r)^T. Gemma's post-norm
writers use the scaled unit that `edit.orthogonalize_` uses.

What LoRA cannot express is refused: bias vectors (GPT-2's output biases) and
fused expert tensors (MoE). For a model whose output head shares the embedding
matrix, the unmerged adapter is exact (PEFT adds the embedding delta to lookups
only); merging would write it into the shared matrix and so into the head too:
untie the head first (`edit.weighted.untie_lm_head_`) or keep the adapter unmerged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import AbliterateError
from ..find.directions import Direction
from ..model.arch import Layout


def lora_factors(layout: Layout, direction: Direction) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """module name -> (kind, A, B) with the exact rank-one update of each writer (float32, on the CPU)."""
    direction.check_model(layout.hidden_size, layout.n_layers)
    out = {}
    for w in layout.embeddings:
        emb = w.param.detach().float()  # (vocab, hidden)
        r = direction.vector.to(emb.device, torch.float32)
        out[w.name.removesuffix(".weight")] = ("embedding", (emb @ r)[None, :].cpu(), -r[:, None].cpu())
    for block in layout.blocks:
        for writers, scale in ((block.attn, block.attn_scale), (block.mlp, block.mlp_scale)):
            r = direction.vector.to(block.attn[0].param.device, torch.float32)
            u = r if scale is None else nn.functional.normalize(r * scale.float().to(r.device), dim=0)
            for w in writers:
                if w.name.endswith(".bias"):
                    raise AbliterateError(f"{w.name}: LoRA adapters cannot change biases; save the edited model "
                                          f"instead (abliterate apply without --adapter)")
                if w.param.dim() != 2 or w.out_dim != 0:
                    raise AbliterateError(f"{w.name} ({tuple(w.param.shape)}) is not a Linear weight (fused experts "
                                          f"or Conv1D); LoRA cannot express its edit here. Save the edited model")
                weight = w.param.detach().float()  # (out, in)
                u = u.to(weight.device)
                out[w.name.removesuffix(".weight")] = ("linear", (u @ weight)[None, :].cpu(), -u[:, None].cpu())
    return out


def save_lora_adapter(model: nn.Module, layout: Layout, direction: Direction, out: Path, base: str) -> Path:
    """Write a PEFT LoRA adapter directory to `out` (an empty directory made by the caller).

    `model` is wrapped by PEFT while saving and unwrapped again before returning.
    """
    try:
        import peft  # optional ([peft]): only adapter outputs need it
    except ImportError as e:
        raise AbliterateError("PEFT adapters need the peft package: pip install 'abliterate[peft]'") from e
    factors = lora_factors(layout, direction)
    config = peft.LoraConfig(r=1, lora_alpha=1, target_modules=sorted(factors), lora_dropout=0.0, bias="none",
                             base_model_name_or_path=base, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    try:
        with torch.no_grad():
            for name, (kind, a, b) in factors.items():
                module = wrapped.base_model.model.get_submodule(name)
                if kind == "embedding":
                    module.lora_embedding_A["default"].copy_(a)
                    module.lora_embedding_B["default"].copy_(b)
                else:
                    module.lora_A["default"].weight.copy_(a)
                    module.lora_B["default"].weight.copy_(b)
        wrapped.save_pretrained(str(out))
    finally:
        wrapped.base_model.unload()
    return out
