"""Pictures of what was found and changed: PNG plots (matplotlib), terminal colours (rich), self-contained HTML.

HTML pages embed their images as data URIs and carry their CSS inline: they open
from disk, offline, without our code, and load nothing from the network.
"""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone

from ..measure.inspection import TokenView

WHITE, RED, BLUE = (255, 255, 255), (214, 39, 40), (31, 119, 180)


def color(value: float) -> tuple[int, int, int]:
    """White at 0, red towards +1 (along the direction), blue towards -1 (against it); saturated beyond."""
    t, end = (min(value, 1.0), RED) if value >= 0 else (min(-value, 1.0), BLUE)
    return tuple(round(w + (e - w) * t) for w, e in zip(WHITE, end))


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


def _shown(token: str) -> str:
    return token.replace("\n", "\u21b5\n").replace("\t", "\u2192")
