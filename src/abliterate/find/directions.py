"""Candidate directions from two sets of mean activations, and the chosen direction's file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AbliterateError
from ..export.files import load_tensors, save_tensors
from ..model.arch import check_layer


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / |v| over the last axis (a zero vector stays zero)."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_difference(harmful: torch.Tensor, harmless: torch.Tensor, projected: bool) -> torch.Tensor:
    """harmful - harmless mean, (H,) float64; projected: without its component along the harmless mean.

    Every direction abliterate takes from activations is this vector (selection's candidates, the search's
    interpolated and per-layer directions), normalised by the caller.
    """
    diff = harmful - harmless
    if projected:
        mu = unit(harmless)
        diff = diff - (diff @ mu) * mu
    return diff


@dataclass
class Candidates:
    """Difference-of-means candidates for every (layer, position).

    `harmful` and `harmless` are mean activations (layers, positions, hidden),
    float64. `positions` are offsets from the end of the prompt (-1 = last token).
    """

    harmful: torch.Tensor
    harmless: torch.Tensor
    positions: tuple[int, ...]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        assert self.harmful.shape == self.harmless.shape and self.harmful.dim() == 3, "means must be (L, P, H)"
        assert self.harmful.shape[1] == len(self.positions)
        assert torch.isfinite(self.harmful).all() and torch.isfinite(self.harmless).all()

    @property
    def n_layers(self) -> int:
        return self.harmful.shape[0]

    def direction(self, layer: int, position: int = -1, projected: bool = False) -> "Direction":
        """The refusal direction at `layer`, `position` (an offset such as -1).

        projected: remove the component along the harmless mean first, so the
        edit leaves the typical activation's size alone and only the part that
        separates refused from answered prompts goes (as in Heretic and
        grimjim's biprojection).
        """
        check_layer(layer, self.n_layers)
        if position not in self.positions:
            raise AbliterateError(f"position {position} was not collected; available: {list(self.positions)}")
        p = self.positions.index(position)
        diff = mean_difference(self.harmful[layer, p], self.harmless[layer, p], projected)
        return Direction(
            vector=unit(diff).float(), layer=layer, position=position, projected=projected,
            scale=float(diff.norm()), meta=dict(self.meta),
        )


@dataclass
class Direction:
    """A unit vector in the residual stream, and where it came from.

    `scale` is the norm of the mean difference it was made from: adding
    `scale * vector` at its layer moves an answered prompt's mean to a refused one's.
    """

    vector: torch.Tensor  # (H,) float32, unit norm
    layer: int
    position: int = -1
    projected: bool = False
    scale: float = 1.0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        assert self.vector.dim() == 1 and torch.isfinite(self.vector).all()

    @property
    def hidden_size(self) -> int:
        return self.vector.shape[0]

    def describe(self) -> dict:
        return {"layer": self.layer, "position": self.position, "projected": self.projected,
                "scale": self.scale, "hidden_size": self.hidden_size, **self.meta}

    def save(self, path: str | Path, candidates: Candidates | None = None) -> Path:
        tensors, meta = {"direction": self.vector}, {"abliterate": self.describe()}
        if candidates is not None:
            tensors |= {"harmful_mean": candidates.harmful, "harmless_mean": candidates.harmless}
            meta["positions"] = list(candidates.positions)
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Direction":
        info, t, _ = load_tensors(path, "abliterate", ("direction",), "direction")
        vector = t["direction"].float()
        kinds = {"layer": int, "position": int, "projected": bool, "scale": (int, float)}
        if not isinstance(info, dict) or any(type(info.get(k)) is bool and t is not bool or
                                             not isinstance(info.get(k), t) for k, t in kinds.items()):
            raise AbliterateError(f"{path} has no usable direction metadata (it needs {', '.join(kinds)}); "
                                  f"make it again with `abliterate directions`")
        if vector.dim() != 1 or not torch.isfinite(vector).all():
            raise AbliterateError(f"{path}: the direction is not a finite vector (shape {tuple(vector.shape)}); "
                                  f"make it again with `abliterate directions`")
        fixed = {k: info.pop(k) for k in kinds}
        info.pop("hidden_size", None)
        return cls(vector=vector, meta=info, **fixed)

    def check_model(self, hidden_size: int, n_layers: int) -> None:
        if self.hidden_size != hidden_size:
            raise AbliterateError(
                f"direction has {self.hidden_size} features but the model's hidden size is {hidden_size}; "
                f"it was made for another model ({self.meta.get('model', 'unknown')}). Compute one for this model"
            )
        if not 0 <= self.layer < n_layers:
            raise AbliterateError(f"direction layer {self.layer} is out of range for a model with {n_layers} layers")


def load_candidates(path: str | Path) -> Candidates:
    """The candidate means a direction file keeps (`directions`, `inspect --save-direction` and runs save them)."""
    info, _, meta = load_tensors(path, "abliterate", (), "direction")
    if "positions" not in meta:
        raise AbliterateError(f"{path} holds a direction but no candidate means; rerun `abliterate directions`")
    _, t, _ = load_tensors(path, "positions", ("harmful_mean", "harmless_mean"), "direction")
    return Candidates(t["harmful_mean"], t["harmless_mean"], tuple(json.loads(meta["positions"])), info)
