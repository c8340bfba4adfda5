"""Residual-stream activations at every layer, at the last prompt positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.arch import text_config
from ..model.forward import batches, forward, input_device
from ..model.streamed import Stream


@dataclass
class Activations:
    """Mean residual stream entering each block, at the last `n_positions` tokens.

    `mean` is (layers, positions, hidden) in float64: summing thousands of
    float32 activations with norms in the hundreds loses digits that a
    difference of two close means needs. `per_prompt` (N, layers, positions,
    hidden) float32 is kept only when asked.
    """

    mean: torch.Tensor
    count: int
    tokens: int = 0  # real (unpadded) tokens processed
    per_prompt: torch.Tensor | None = None


@torch.inference_mode()
def collect(model, tokenizer, texts: list[str], *, n_positions: int, batch_size: int,
            keep: bool = False, desc: str | None = "activations") -> Activations:
    n_layers = text_config(model).num_hidden_layers
    device = input_device(model)
    total, tokens = None, 0
    kept = [None] * len(texts) if keep else None
    for batch in batches(tokenizer, texts, batch_size, device, desc):
        out = forward(model, batch, output_hidden_states=True)
        tokens += int(batch.attention_mask.sum())
        # hidden_states[l] is the input of block l; the last entry (after the
        # final norm in most models) is not a block input and is left out.
        # (B, L, P, H); a device-mapped model's blocks sit on several devices: the states are gathered on one
        resid = torch.stack([h[:, -n_positions:, :].to(device) for h in out.hidden_states[:n_layers]], dim=1)
        s = resid.double().sum(0)
        total = s if total is None else total + s
        if keep:
            for row, i in enumerate(batch.index):
                kept[i] = resid[row].float().cpu()
    mean = (total / len(texts)).cpu()
    assert torch.isfinite(mean).all(), "non-finite activations: check the model's dtype (try --dtype float32)"
    return Activations(mean, len(texts), tokens, torch.stack(kept) if keep else None)


@torch.inference_mode()
def collect_streamed(streamed, sets: list[list[str]], *, n_positions: int, desc: str = "activations"
                     ) -> list[Activations]:
    """`collect` for each list of texts, in one pass of `streamed` (a `model.streamed.StreamedModel`): each
    block read once for every list. The same batches, the same float64 sums in the same order."""
    tok = streamed.tokenizer
    ids = [tok(list(texts), add_special_tokens=False).input_ids for texts in sets]
    n_layers, hidden = len(streamed.blocks), streamed.hidden_size
    totals = [torch.zeros(n_layers, n_positions, hidden, dtype=torch.float64) for _ in sets]
    tokens = [0] * len(sets)

    def tap(s: int, layer: int, batch, resid: torch.Tensor) -> None:  # resid (B, T, H) entering block `layer`
        totals[s][layer] += resid[:, -n_positions:, :].double().sum(0).cpu()
        if layer == 0:
            tokens[s] += int(batch.attention_mask.sum())

    for _ in streamed.run([Stream(i) for i in ids], tap=tap, logits=False, desc=desc):
        pass
    out = []
    for total, n, texts in zip(totals, tokens, sets):
        mean = total / len(texts)
        assert torch.isfinite(mean).all(), "non-finite activations: check the model's dtype (try --dtype float32)"
        out.append(Activations(mean, len(texts), n))
    return out
