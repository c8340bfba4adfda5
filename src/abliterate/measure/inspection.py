"""Look inside: how each layer separates the two prompt sets, and where a direction lights up token by token.

Numbers only; `views` draws them. Projections are onto unit directions, in the
residual stream's own units.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import AbliterateError
from ..find.directions import Direction, unit
from ..find.selection import Selection
from ..model.arch import check_layer, text_config
from ..model.forward import batches, forward, input_device


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a random `pos` value > a random `neg` value), ties counting half (the Mann-Whitney AUC)."""
    diff = pos[:, None] - neg[None, :]  # (N, M)
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@dataclass
class LayerStats:
    """One layer's geometry, at the last prompt token."""

    layer: int
    harmful_norm: float  # |mean harmful activation|
    harmless_norm: float
    diff_norm: float  # |mean difference| = the gap between the means along their own direction
    relative_gap: float  # diff_norm / harmless_norm: comparable across depths, where norms grow
    cos_prev: float | None  # cosine between this layer's direction and the previous layer's
    cohen_d: float  # gap of per-prompt projections / their pooled standard deviation
    auc: float  # separability of per-prompt projections (0.5 = none, 1 = perfect)
    along_chosen: float  # gap of the means projected on the chosen direction
    bypass: float | None = None  # selection's score, where it scored this layer (lower is better)
    kl: float | None = None
    chosen: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def layer_stats(harmful: torch.Tensor, harmless: torch.Tensor, chosen: Direction,
                selection: Selection | None = None) -> list[LayerStats]:
    """Per-layer separation from per-prompt activations `harmful` (N, L, H) and `harmless` (M, L, H).

    Statistics are in-sample: the prompts that made each direction also measure it,
    as in the selection's candidates; `bypass` and `kl` are selection's held-out scores.
    """
    assert harmful.dim() == 3 and harmful.shape[1:] == harmless.shape[1:], (harmful.shape, harmless.shape)
    a, b = harmful.double(), harmless.double()
    mu_a, mu_b = a.mean(0), b.mean(0)  # (L, H)
    dirs = unit(mu_a - mu_b)  # (L, H)
    ref = chosen.vector.double()
    scored = {}
    if selection is not None:
        scored = {s.layer: s for s in selection.scores if s.position == chosen.position}
    out = []
    for layer in range(a.shape[1]):
        pa, pb = a[:, layer] @ dirs[layer], b[:, layer] @ dirs[layer]  # (N,), (M,)
        pooled = ((pa.var() * (len(pa) - 1) + pb.var() * (len(pb) - 1)) / max(len(pa) + len(pb) - 2, 1)).sqrt()
        s = scored.get(layer)
        out.append(LayerStats(
            layer=layer,
            harmful_norm=float(mu_a[layer].norm()), harmless_norm=float(mu_b[layer].norm()),
            diff_norm=float((mu_a[layer] - mu_b[layer]).norm()),
            relative_gap=float((mu_a[layer] - mu_b[layer]).norm() / mu_b[layer].norm().clamp_min(1e-12)),
            cos_prev=float(dirs[layer] @ dirs[layer - 1]) if layer else None,
            cohen_d=float((pa.mean() - pb.mean()) / pooled.clamp_min(1e-12)),
            auc=auc(pa, pb),
            along_chosen=float((mu_a[layer] - mu_b[layer]) @ ref),
            bypass=s.bypass if s else None, kl=s.kl if s else None, chosen=layer == chosen.layer,
        ))
    return out


def peak(stats: list[LayerStats], key: str, layers: list[int] | None = None) -> int:
    """The layer where `key` is largest (among `layers`, if given)."""
    pool = [s for s in stats if layers is None or s.layer in layers]
    return max(pool, key=lambda s: getattr(s, key)).layer


@dataclass
class TokenView:
    """How much each token's residual points along a direction, at every layer.

    `projections` is (T, L): entry [t, l] is h_l(t) . r, with h_l the stream
    entering block l; `norms` is |h_l(t)|. Colours use the cosine (projection / norm):
    residual norms grow tenfold with depth and attention-sink tokens (the first
    one, usually) are larger still, so raw projections would show only those.
    """

    tokens: list[str]
    projections: torch.Tensor  # (T, L) float32
    norms: torch.Tensor  # (T, L) float32
    layer: int  # the layer shown in one-line views

    def cosine(self) -> torch.Tensor:
        return self.projections / self.norms.clamp_min(1e-12)

    @property
    def scale(self) -> float:
        """The cosine at which colours saturate: the 98th percentile of |cosine| over tokens and layers."""
        return max(float(self.cosine().abs().flatten().quantile(0.98)), 1e-6)

    def scaled(self) -> torch.Tensor:
        """Cosines divided by `scale` (colours saturate at +-1)."""
        return self.cosine() / self.scale


@torch.inference_mode()
def token_projections(model, tokenizer, text: str, direction: Direction, *, layer: int | None = None) -> TokenView:
    """Per-token, per-layer projections of the formatted `text` onto `direction`."""
    if not text.strip():
        raise AbliterateError("the prompt is empty; give some text with --prompt")
    n_layers = text_config(model).num_hidden_layers
    direction.check_model(text_config(model).hidden_size, n_layers)
    layer = check_layer(direction.layer if layer is None else layer, n_layers)
    device = input_device(model)
    batch = next(batches(tokenizer, [text], 1, device))
    out = forward(model, batch, output_hidden_states=True)
    resid = torch.stack(out.hidden_states[:n_layers], dim=1)[0].float().cpu()  # (L, T, H)
    proj = (resid @ direction.vector.float()).T.contiguous()  # (T, L)
    norms = resid.norm(dim=-1).T.contiguous()  # (T, L)
    tokens = [tokenizer.decode([i]) for i in batch.input_ids[0].tolist()]
    return TokenView(tokens, proj, norms, layer)
