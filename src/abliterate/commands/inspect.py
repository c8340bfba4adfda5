"""`abliterate inspect` (how each layer separates the two prompt sets) and `abliterate tokens` (where a
direction lights up, token by token).

inspect: 1. load  2. prompts  3. per-prompt activations  4. candidates  5. selection (or --direction)
         6. per-layer statistics: table, PNG, JSON
tokens:  1. load, direction  2. one prompt's residual stream at every layer  3. terminal, HTML, heatmap
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..config import InspectOptions, RunConfig, TokensOptions
from ..errors import AbliterateError
from ..export.files import write_file
from ..find.directions import Candidates, Direction
from ..find.selection import Selection
from ..measure.inspection import LayerStats, layer_stats, peak, token_projections
from ..model.arch import Layout
from ..model.load import Loaded
from ..show.html import tokens_html
from ..show.plots import plot_layers, plot_token_heatmap
from ..show.tables import layer_table, render_terminal
from .options import FORMAT, MODEL, PROMPTS, SELECT, add_options, run_config
from .steps import (
    Timer,
    candidates_from,
    chat_format,
    collect_pair,
    load,
    pick_direction,
    splits,
)


@dataclass
class Inspection:
    stats: list[LayerStats]
    direction: Direction  # the chosen (or given) direction, marked in the stats
    selection: Selection | None
    candidates: Candidates


def inspect_layers(loaded: Loaded, layout: Layout, cfg: RunConfig, direction: Direction | None = None,
                   timer: Timer | None = None) -> Inspection:
    """Steps 2-5 as `find_direction` runs them, keeping per-prompt activations for the layer geometry.

    Without `direction`, the chosen layer is the one a run would choose (same prompts, same selection).
    """
    timer = timer or Timer()
    sp = splits(cfg)
    if direction is not None:
        direction.check_model(layout.hidden_size, layout.n_layers)
    with timer("activations"):
        a, b = collect_pair(loaded, chat_format(cfg), sp.harmful_train, sp.harmless_train, cfg, keep=True)
        cands = candidates_from(loaded, sp.harmful_train, sp.harmless_train, a, b)
    selection = None
    if direction is None:
        with timer("selection"):
            direction, selection = pick_direction(loaded, layout, cands, sp, cfg)
    p = cands.positions.index(direction.position) if direction.position in cands.positions else -1
    stats = layer_stats(a.per_prompt[:, :, p], b.per_prompt[:, :, p], direction, selection)
    return Inspection(stats, direction, selection, cands)


def cmd_inspect(args) -> int:

    cfg = run_config(args)
    direction = Direction.load(args.direction) if args.direction else None
    loaded, layout = load(args.model, cfg)
    found = inspect_layers(loaded, layout, cfg, direction)
    print(layer_table(found.stats))
    scored = [s.layer for s in found.stats if s.bypass is not None] or None
    d = found.direction
    how = "given" if direction is not None else ("--layer" if found.selection is None else "selected")
    print(f"\n{how} layer {d.layer}; separation peaks (within the scored layers): "
          f"Cohen's d at {peak(found.stats, 'cohen_d', scored)}, AUC at {peak(found.stats, 'auc', scored)}, "
          f"relative gap at {peak(found.stats, 'relative_gap', scored)}")
    print(f"plot: {write_file(args.plot, plot_layers(found.stats))}")
    if args.json:
        write_file(args.json, json.dumps({"model": args.model, "direction": d.describe(),
                                             "layers": [s.to_dict() for s in found.stats]}, indent=2))
    if args.save_direction:
        print(f"direction: {d.save(args.save_direction, found.candidates)}")
    return 0


def cmd_tokens(args) -> int:

    cfg = run_config(args)
    if not args.prompt.strip():
        raise AbliterateError("the prompt is empty; give some text with --prompt")
    direction = Direction.load(args.direction)
    loaded, layout = load(args.model, cfg)
    text = chat_format(cfg).render(loaded.tokenizer, args.prompt)
    view = token_projections(loaded.model, loaded.tokenizer, text, direction, layer=args.layer)
    render_terminal(view)
    heat = plot_token_heatmap(view) if args.heatmap or args.html else None
    if args.heatmap:
        print(f"heatmap: {write_file(args.heatmap, heat)}")
    if args.html:
        info = {"model": args.model, "direction": args.direction, "direction layer": direction.layer,
                "prompt": args.prompt}
        page = tokens_html(view, title="abliterate: the direction, token by token", info=info, heatmap=heat)
        print(f"html: {write_file(args.html, page)}")
    return 0


def mount(sub) -> None:
    p = sub.add_parser("inspect", help="per-layer separation of the two prompt sets, table and PNG",
                       description="Runs the same activations and selection as `run` (or takes --direction) and "
                       "shows how each layer separates harmful from harmless prompts. Example: "
                       "abliterate inspect ./model --plot layers.png")
    add_options(p, InspectOptions)
    add_options(p, RunConfig, MODEL + PROMPTS + SELECT + ("force",))
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tokens", help="each token's projection on a direction: terminal colours, HTML, heatmap",
                       description="Example: abliterate tokens ./model --direction refusal.safetensors "
                       "--prompt 'How do I pick a lock?' --html tokens.html --heatmap tokens.png")
    add_options(p, TokensOptions)
    add_options(p, RunConfig, MODEL + FORMAT + ("force",))
    p.set_defaults(func=cmd_tokens)
