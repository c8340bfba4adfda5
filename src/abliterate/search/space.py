"""The search space: which options a search may vary, one point of it (`Params`), and its resolution into a
weighted ablation from the collected activations (`DirectionSource`)."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch

from ..edit.weighted import NORM_MODES, Ablation
from ..errors import AbliterateError
from ..find.directions import mean_difference, unit

# Each can be switched off to measure what it brings (benchmarks/bench_search.py).
OPTIONS = {
    "position": "the direction may come from any post-instruction token, not only the last one",
    "fractional": "direction index between two layers (interpolated), not only whole layers",
    "per_layer": "each block may use its own layer's direction instead of one for all",
    "projected": "the direction may be orthogonalized against the harmless mean (biprojection)",
    "embed": "the token embeddings are edited too, by their own weight",
    "row": "norm preservation per output row (Heretic's)",
    "column": "norm preservation per input column (grimjim's biprojection)",
    "subspace": "up to 3 directions (top singular vectors of per-prompt differences)",
    "strength": "weights up to 1.5 (overshoot), not only up to 1",
}


# On by default: what measurably helps. In equal searches with and without each option on the reference model
# (benchmarks/bench_option_searches.py, README "Results") none beat the noise between two searches of the same
# space, so the default search varies the direction's layer and the two components' profiles only.
# 'all' switches every option on.
DEFAULT_OPTIONS: tuple[str, ...] = ()


def parse_options(text: str) -> tuple[str, ...]:
    """'default', 'all', 'none', or a comma list; '+name' / '-name' adjust the defaults."""
    text = text.strip()
    if text in ("", "default"):
        return DEFAULT_OPTIONS
    if text in ("all", "none"):
        return tuple(OPTIONS) if text == "all" else ()
    items = [t.strip() for t in text.split(",") if t.strip()]
    relative = all(t[0] in "+-" for t in items)
    chosen = set(DEFAULT_OPTIONS) if relative else set()
    for t in items:
        name = t.lstrip("+-")
        if name not in OPTIONS:
            raise AbliterateError(f"search option {name!r} is unknown; options: {', '.join(OPTIONS)}")
        (chosen.discard if t.startswith("-") else chosen.add)(name)
    return tuple(o for o in OPTIONS if o in chosen)


@dataclass
class Profile:
    """Weight of one component along depth: `peak` at `center`, falling linearly to `floor * peak` at
    `width` layers away, 0 beyond (those layers are untouched)."""

    peak: float
    center: float
    floor: float  # fraction of the peak at the edges
    width: float

    def weights(self, n_layers: int) -> torch.Tensor:
        d = (torch.arange(n_layers, dtype=torch.float64) - self.center).abs()
        w = self.peak * (1 + (self.floor - 1) * d / max(self.width, 1e-6))
        return torch.where(d <= self.width, w, torch.zeros_like(w)).float()


@dataclass
class Params:
    """One point of the search space; `Params.classic(L)` is plain abliteration (Arditi et al.)."""

    direction: float  # layer index of the direction, fractional: interpolated between two layers
    per_layer: bool  # each block uses its own layer's direction instead
    projected: bool
    k: int  # directions removed
    norm: str
    attn: Profile
    mlp: Profile
    embed: float
    position: int = -1  # token the directions are taken at, counted from the end of the prompt

    @classmethod
    def classic(cls, n_layers: int, options: tuple[str, ...] = DEFAULT_OPTIONS, at: float = 0.6,
                weight: float = 1.0) -> "Params":
        """Every writer edited by `weight` along the direction of the layer at fraction `at` of depth."""
        full = Profile(weight, (n_layers - 1) / 2, 1.0, float(n_layers))
        lo, hi = _direction_range(n_layers, "fractional" in options)
        layer = float(min(max(round(at * (n_layers - 1)), lo), hi))
        embed = weight if "embed" in options else 0.0
        return cls(layer, False, False, 1, "none", full, copy.copy(full), embed, -1)

    @classmethod
    def seeds(cls, n_layers: int, options: tuple[str, ...] = DEFAULT_OPTIONS) -> list["Params"]:
        """The first trials of a study: plain abliteration, then the plain edit at half weight with the direction
        at 50%, 60% and 70% of depth (on the reference model, half weight kept most of the effect at a fifth of
        the KL; these points show the sampler where the front lies)."""
        return [cls.classic(n_layers, options)] + [cls.classic(n_layers, options, at, 0.5) for at in (0.5, 0.6, 0.7)]

    def flat(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("attn", "mlp")}
        for c in ("attn", "mlp"):
            out.update({f"{c}_{k}": v for k, v in asdict(getattr(self, c)).items()})
        return out

    @classmethod
    def from_flat(cls, d: dict) -> "Params":
        prof = {c: Profile(*(float(d[f"{c}_{k}"]) for k in ("peak", "center", "floor", "width")))
                for c in ("attn", "mlp")}
        return cls(float(d["direction"]), bool(d["per_layer"]), bool(d["projected"]), int(d["k"]), str(d["norm"]),
                   prof["attn"], prof["mlp"], float(d["embed"]), int(d.get("position", -1)))


def _direction_range(n_layers: int, fractional: bool) -> tuple[float, float]:
    """Directions from 30% to 90% of depth (earlier ones barely separate the sets, later ones act on words)."""
    lo, hi = 0.3 * (n_layers - 1), 0.9 * (n_layers - 1)
    if fractional:
        return lo, hi
    return math.ceil(lo), max(math.ceil(lo), math.floor(hi))


def suggest(trial, n_layers: int, options: tuple[str, ...], n_positions: int = 1) -> Params:
    """Ask an Optuna trial for a point. Every parameter is always asked (a fixed space suits multivariate TPE)."""
    L = n_layers
    position = trial.suggest_int("position", -n_positions if "position" in options else -1, -1)
    lo, hi = _direction_range(L, "fractional" in options)
    if "fractional" in options:
        direction = trial.suggest_float("direction", lo, hi)
    else:
        direction = float(trial.suggest_int("direction", lo, hi))
    per_layer = trial.suggest_categorical("per_layer", [False, True] if "per_layer" in options else [False])
    projected = trial.suggest_categorical("projected", [False, True] if "projected" in options else [False])
    k = trial.suggest_int("k", 1, 3 if "subspace" in options else 1)
    norms = ["none"] + [m for m in NORM_MODES[1:] if m in options]
    norm = trial.suggest_categorical("norm", norms)
    top = 1.5 if "strength" in options else 1.0
    prof = {}
    for c in ("attn", "mlp"):
        prof[c] = Profile(trial.suggest_float(f"{c}_peak", 0.2, top),
                          trial.suggest_float(f"{c}_center", 0.2 * (L - 1), L - 1),
                          trial.suggest_float(f"{c}_floor", 0.0, 1.0), trial.suggest_float(f"{c}_width", 1.0, L))
    embed = trial.suggest_float("embed", 0.0, 1.0) if "embed" in options else trial.suggest_float("embed", 0.0, 0.0)
    return Params(direction, per_layer, projected, k, norm, prof["attn"], prof["mlp"], embed, position)


@dataclass
class DirectionSource:
    """Per-prompt harmful activations and both means at every block input, at the last P prompt tokens.

    harmful: (N, L, P, H) float32; harmful_mean, harmless_mean: (L, P, H) float64. Position -1 is
    the last prompt token, -P the first of the template's post-instruction tokens.
    """

    harmful: torch.Tensor
    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor

    @property
    def n_layers(self) -> int:
        return self.harmful_mean.shape[0]

    @property
    def n_positions(self) -> int:
        return self.harmful_mean.shape[1]

    def diff(self, layer: int, projected: bool, position: int = -1) -> torch.Tensor:
        if not -self.n_positions <= position <= -1:
            raise AbliterateError(f"token position {position} is outside the {self.n_positions} kept "
                                  f"(-{self.n_positions}..-1)")
        return unit(mean_difference(self.harmful_mean[layer, position], self.harmless_mean[layer, position], projected))

    def direction(self, index: float, projected: bool, position: int = -1) -> torch.Tensor:
        """Unit direction at a fractional layer index: the normalized interpolation of two layers' directions."""
        a = min(max(int(math.floor(index)), 0), self.n_layers - 1)
        b = min(a + 1, self.n_layers - 1)
        t = index - a
        return unit((1 - t) * self.diff(a, projected, position) + t * self.diff(b, projected, position))

    def basis(self, index: float, projected: bool, k: int, position: int = -1) -> torch.Tensor:
        """(k, H) orthonormal: the direction, then the top singular vectors of the per-prompt differences
        (harmful prompt minus harmless mean, at the nearest layer) with the direction removed."""
        r = self.direction(index, projected, position)
        if k == 1:
            return r.float().unsqueeze(0)
        layer = min(max(round(index), 0), self.n_layers - 1)
        diffs = self.harmful[:, layer, position].double() - self.harmless_mean[layer, position]  # (N, H)
        diffs = diffs - (diffs @ r).unsqueeze(-1) * r
        _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
        q = torch.linalg.qr(torch.cat([r.unsqueeze(0), vh[: k - 1]]).T).Q.T  # (k, H)
        q[0] = q[0] * torch.sign(q[0] @ r)
        return q.float()

    def ablation(self, p: Params) -> Ablation:
        L = self.n_layers
        if p.per_layer:
            # the writers of block l write the stream entering block l + 1
            bases = torch.stack([self.basis(min(i + 1, L - 1), p.projected, p.k, p.position) for i in range(L)])
        else:
            bases = self.basis(p.direction, p.projected, p.k, p.position).unsqueeze(0).expand(L, -1, -1).contiguous()
        return Ablation(bases, p.attn.weights(L), p.mlp.weights(L), bases[0].clone(), p.embed, p.norm, p.flat())
