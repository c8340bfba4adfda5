"""Plots as PNG (matplotlib's object API: no pyplot, no global backend state): the layers, the selection,
a token heatmap, a steering sweep."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from ..measure.behaviour import Behaviour
from ..measure.inspection import LayerStats, TokenView


def plot_sweep(rows: list[Behaviour], path: str | Path, behaviour: str = "refusal") -> Path:
    """Behaviour rate and coherence against strength, one PNG."""
    xs = [r.strength for r in rows]
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    ax.plot(xs, [r.rate for r in rows], "o-", color="tab:red", label=f"{behaviour} rate")
    ax.set_xlabel(f"strength (x mean difference), layers {','.join(map(str, rows[0].layers))}")
    ax.set_ylabel(f"{behaviour} rate", color="tab:red")
    ax.set_ylim(-0.02, 1.02)
    ax2 = ax.twinx()
    ax2.plot(xs, [r.coherence for r in rows], "s--", color="tab:blue", label="coherence")
    ax2.set_ylabel("coherence (mean log-prob / token, original model)", color="tab:blue")
    ax.set_title("Steering sweep")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def _save(fig, path: str | Path | None) -> bytes:
    """PNG bytes of `fig`, also written to `path` when given."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def plot_layers(stats: list[LayerStats], path: str | Path | None = None) -> bytes:
    """Separation per layer (AUC, Cohen's d, relative gap, neighbour cosine), selection scores, chosen layer marked."""
    layers = [s.layer for s in stats]
    chosen = next((s.layer for s in stats if s.chosen), None)
    scored = [s for s in stats if s.bypass is not None]
    fig = Figure(figsize=(7.5, 8.5 if scored else 6))
    axes = fig.subplots(3 if scored else 2, 1, sharex=True)
    ax = axes[0]
    ax.plot(layers, [s.cohen_d for s in stats], "o-", color="tab:red", label="Cohen's d of projections")
    ax.set_ylabel("Cohen's d")
    ax2 = ax.twinx()
    ax2.plot(layers, [s.auc for s in stats], "s--", color="tab:blue", label="AUC")
    ax2.set_ylabel("AUC", color="tab:blue")
    ax2.set_ylim(0.45, 1.02)
    ax.set_title("How the harmful and harmless prompts separate along each layer's direction")
    _legend(ax, ax2)
    ax = axes[1]
    ax.plot(layers, [s.relative_gap for s in stats], "o-", color="tab:purple", label="|mean diff| / |harmless mean|")
    ax.plot(layers[1:], [s.cos_prev for s in stats[1:]], "^-", color="tab:green", label="cos(previous layer)")
    ax.plot(layers, [s.along_chosen / max(s.harmless_norm, 1e-12) for s in stats], "v:", color="tab:orange",
            label="gap along chosen direction / |harmless mean|")
    ax.set_ylabel("ratio / cosine")
    ax.legend(loc="upper left", fontsize=8)
    if scored:
        ax = axes[2]
        ax.plot([s.layer for s in scored], [s.bypass for s in scored], "o-", color="black",
                label="bypass: refusal score with direction ablated (lower = better)")
        ax.set_ylabel("refusal score (log-odds)")
        ax3 = ax.twinx()
        ax3.plot([s.layer for s in scored], [s.kl for s in scored], "s--", color="tab:gray", label="KL")
        ax3.set_ylabel("KL (harmless, first token)", color="tab:gray")
        _legend(ax, ax3)
    for ax in axes:
        if chosen is not None:
            ax.axvline(chosen, color="tab:red", alpha=0.35, lw=6, label="_chosen")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(f"layer (chosen: {chosen})")
    fig.tight_layout()
    return _save(fig, path)


def _legend(ax, twin) -> None:
    """One legend for a plot and its twin axis."""
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)


def plot_token_heatmap(view: TokenView, path: str | Path | None = None) -> bytes:
    """Token-by-layer heatmap of the scaled projections."""
    values = view.cosine().T.numpy()  # (L, T)
    n_layers, n_tokens = values.shape
    fig = Figure(figsize=(min(2 + 0.28 * n_tokens, 40), 1.5 + 0.22 * n_layers))
    ax = fig.subplots()
    im = ax.imshow(values, aspect="auto", cmap="RdBu_r", origin="lower", vmin=-view.scale, vmax=view.scale)
    ax.set_xticks(range(n_tokens))
    ax.set_xticklabels([repr(t)[1:-1][:14] for t in view.tokens], rotation=90, fontsize=7)
    ax.set_ylabel("layer")
    ax.axhline(view.layer, color="black", lw=0.8, ls=":")
    fig.colorbar(im, ax=ax, label="cosine(residual, direction)", fraction=0.03, extend="both")
    ax.set_title("Cosine of each token's residual stream with the direction, by layer")
    fig.tight_layout()
    return _save(fig, path)


def plot_selection(scores, chosen_layer: int, path: str | Path | None = None) -> bytes:
    """Selection's scores per candidate layer (last position): bypass, induce where checked, and KL."""
    pos = max(s.position for s in scores)
    rows = [s for s in scores if s.position == pos]
    fig = Figure(figsize=(7.5, 3.8))
    ax = fig.subplots()
    ax.plot([s.layer for s in rows], [s.bypass for s in rows], "o-", color="black", label="bypass (lower = better)")
    checked = [s for s in rows if s.induce is not None]
    if checked:
        ax.plot([s.layer for s in checked], [s.induce for s in checked], "D", color="tab:red",
                label="induce (higher = better)")
    ax.set_ylabel("refusal score (log-odds)")
    ax.set_xlabel("layer")
    ax2 = ax.twinx()
    ax2.plot([s.layer for s in rows], [s.kl for s in rows], "s--", color="tab:gray", label="KL")
    ax2.set_ylabel("KL, harmless first token", color="tab:gray")
    ax.axvline(chosen_layer, color="tab:red", alpha=0.35, lw=6)
    ax.set_title(f"Candidate directions (position {pos}); chosen layer {chosen_layer}")
    _legend(ax, ax2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
