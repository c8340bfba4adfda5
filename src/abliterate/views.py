"""Pictures of what was found and changed: PNG plots (matplotlib), terminal colours (rich), self-contained HTML.

HTML pages embed their images as data URIs and carry their CSS inline: they open
from disk, offline, without our code, and load nothing from the network.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path

from .inspection import LayerStats, TokenView

WHITE, RED, BLUE = (255, 255, 255), (214, 39, 40), (31, 119, 180)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path | None) -> bytes:
    """PNG bytes of `fig`, also written to `path` when given."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def plot_layers(stats: list[LayerStats], path: str | Path | None = None) -> bytes:
    """Separation per layer (AUC, Cohen's d, relative gap, neighbour cosine), selection scores, chosen layer marked."""
    plt = _plt()
    layers = [s.layer for s in stats]
    chosen = next((s.layer for s in stats if s.chosen), None)
    scored = [s for s in stats if s.bypass is not None]
    fig, axes = plt.subplots(3 if scored else 2, 1, figsize=(7.5, 8.5 if scored else 6), sharex=True)
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


def layer_table(stats: list[LayerStats]) -> str:
    """The per-layer table as fixed-width text."""
    head = (f"{'layer':>5} {'|harm|':>8} {'|harmless|':>10} {'|diff|':>8} {'rel gap':>8} {'cos prev':>8} "
            f"{'d':>6} {'AUC':>6} {'along':>8} {'bypass':>7} {'kl':>7}")
    lines = [head]
    for s in stats:
        cos = f"{s.cos_prev:8.3f}" if s.cos_prev is not None else f"{'-':>8}"
        byp = f"{s.bypass:7.2f}" if s.bypass is not None else f"{'-':>7}"
        kl = f"{s.kl:7.3f}" if s.kl is not None else f"{'-':>7}"
        mark = "  <- chosen" if s.chosen else ""
        lines.append(f"{s.layer:5d} {s.harmful_norm:8.1f} {s.harmless_norm:10.1f} {s.diff_norm:8.2f} "
                     f"{s.relative_gap:8.3f} {cos} {s.cohen_d:6.2f} {s.auc:6.3f} {s.along_chosen:8.2f} "
                     f"{byp} {kl}{mark}")
    return "\n".join(lines)


def color(value: float) -> tuple[int, int, int]:
    """White at 0, red towards +1 (along the direction), blue towards -1 (against it); saturated beyond."""
    t, end = (min(value, 1.0), RED) if value >= 0 else (min(-value, 1.0), BLUE)
    return tuple(round(w + (e - w) * t) for w, e in zip(WHITE, end))


def _shown(token: str) -> str:
    return token.replace("\n", "\u21b5\n").replace("\t", "\u2192")


def render_terminal(view: TokenView, console=None) -> None:
    """The prompt's tokens coloured by their projection at `view.layer`, printed with rich."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    values = view.scaled()[:, view.layer].tolist()
    text = Text()
    for token, v in zip(view.tokens, values):
        r, g, b = color(v)
        text.append(_shown(token), style=f"black on rgb({r},{g},{b})")
    console.print(f"layer {view.layer}: cosine with the direction, red = along it, blue = against it, "
                  f"saturated at {view.scale:.3f}")
    console.print(text)


def plot_token_heatmap(view: TokenView, path: str | Path | None = None) -> bytes:
    """Token-by-layer heatmap of the scaled projections."""
    plt = _plt()
    values = view.cosine().T.numpy()  # (L, T)
    n_layers, n_tokens = values.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.28 * n_tokens, 40), 1.5 + 0.22 * n_layers))
    im = ax.imshow(values, aspect="auto", cmap="RdBu_r", origin="lower", vmin=-view.scale, vmax=view.scale)
    ax.set_xticks(range(n_tokens))
    ax.set_xticklabels([repr(t)[1:-1][:14] for t in view.tokens], rotation=90, fontsize=7)
    ax.set_ylabel("layer")
    ax.axhline(view.layer, color="black", lw=0.8, ls=":")
    fig.colorbar(im, ax=ax, label="cosine(residual, direction)", fraction=0.03, extend="both")
    ax.set_title("Cosine of each token's residual stream with the direction, by layer")
    fig.tight_layout()
    return _save(fig, path)


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.pairs td { width: 33%; white-space: pre-wrap; font-size: 0.9em; }
.refused { background: #fde8e8; } .meta { color: #666; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; line-height: 1.9; }
.tokens span { border-radius: 3px; padding: 1px 0; }
.legend span { display: inline-block; padding: 0 0.6em; margin-right: 0.3em; }
"""


def _page(title: str, body: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=\"meta\">abliterate, {stamp}</p>{body}</body></html>\n")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape('-' if value is None else str(value))}</td>"


def html_table(header: list[str] | None, rows: list[list]) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _token_line(tokens: list[str], values: list[float], cosine: list[float], raw: list[float]) -> str:
    spans = []
    for token, v, c, p in zip(tokens, values, cosine, raw):
        r, g, b = color(v)
        spans.append(f'<span style="background: rgb({r},{g},{b})" title="cosine {c:.3f}, projection {p:.2f}">'
                     f"{html.escape(_shown(token))}</span>")
    return "".join(spans)


def tokens_html(view: TokenView, *, title: str, info: dict, heatmap: bytes | None = None) -> str:
    """One page: the prompt coloured at the chosen layer, every layer below it, and the heatmap."""
    scaled, cos, raw = view.scaled(), view.cosine(), view.projections

    def line(layer: int) -> str:
        return _token_line(view.tokens, scaled[:, layer].tolist(), cos[:, layer].tolist(), raw[:, layer].tolist())

    legend = "".join(f'<span style="background: rgb{color(v / view.scale)}">{v:+.3f}</span>'
                     for v in (-view.scale, -view.scale / 2, 0.0, view.scale / 2, view.scale))
    body = [f"<p class=\"meta\">{html.escape(', '.join(f'{k}: {v}' for k, v in info.items()))}</p>",
            "<p class=\"legend\">Colour: cosine between each token's residual stream (entering the layer) and the "
            f"direction; red along it, blue against it, saturated at the 98th percentile. {legend} "
            "Hover a token for its cosine and raw projection.</p>",
            f"<h2>Layer {view.layer}</h2>", f'<div class="tokens">{line(view.layer)}</div>']
    if heatmap is not None:
        body += ["<h2>Every layer</h2>", _img(heatmap, "token by layer heatmap")]
    rows = "".join(f"<tr><th>{layer}</th><td class=\"tokens\">{line(layer)}</td></tr>"
                   for layer in range(scaled.shape[1]))
    body.append(f"<details><summary>Each layer as coloured text</summary><table>{rows}</table></details>")
    return _page(title, "\n".join(body))


def report_html(title: str, *, info: dict, metrics: tuple[list[str], list[list]] | None = None,
                images: list[tuple[str, bytes]] = (), tables: list[tuple[str, list[str], list[list]]] = (),
                pairs: list[tuple[str, str, str]] = (), labels: tuple[str, str] = ("original", "edited"),
                flags: list[tuple[bool, bool]] | None = None) -> str:
    """A run's report: facts, metrics before and after, plots, extra tables and answers side by side.

    `flags[i]` marks which of the two answers to prompt i counted as the behaviour
    (a refusal); those cells are shaded.
    """
    body = [html_table(None, [[k, str(v)] for k, v in info.items()])]
    if metrics:
        body += ["<h2>Metrics</h2>", html_table(*metrics)]
    for caption, png in images:
        body += [f"<h2>{html.escape(caption)}</h2>", _img(png, caption)]
    for caption, header, rows in tables:
        body += [f"<h2>{html.escape(caption)}</h2>", html_table(header, rows)]
    if pairs:
        rows = []
        for i, (prompt, a, b) in enumerate(pairs):
            fa, fb = flags[i] if flags else (False, False)
            rows.append(f"<tr><td>{html.escape(prompt)}</td><td class=\"{'refused' if fa else ''}\">"
                        f"{html.escape(a)}</td><td class=\"{'refused' if fb else ''}\">{html.escape(b)}</td></tr>")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in ("prompt", *labels))
        body += ["<h2>Answers side by side</h2>",
                 "<p class=\"meta\">Shaded: counted as a refusal (or the steered behaviour).</p>",
                 f'<table class="pairs"><tr>{head}</tr>{"".join(rows)}</table>']
    return _page(title, "\n".join(body))


def plot_selection(scores, chosen_layer: int, path: str | Path | None = None) -> bytes:
    """Selection's scores per candidate layer (last position): bypass, induce where checked, and KL."""
    plt = _plt()
    pos = max(s.position for s in scores)
    rows = [s for s in scores if s.position == pos]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
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
