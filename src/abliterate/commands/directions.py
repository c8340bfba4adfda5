"""`abliterate directions` (find and select the refusal direction) and `abliterate concept` (any two prompt sets).

directions: 1. load (--stream: the skeleton only)  2. prompts  3. activations  4. candidates  5. selection  6. save the direction file
concept:    1. load  2. the two prompt sets  3. activations  4. their difference at one layer  5. save
"""

from __future__ import annotations

from ..config import ConceptOptions, DirectionsOptions, RunConfig
from ..find.prompts import load_prompts
from ..show.tables import selection_table
from .options import MAPPED, MODEL, PROMPTS, SELECT, STREAM, add_options, run_config
from .steps import (
    chat_format,
    compute_candidates,
    find_direction,
    load,
    open_streamed,
    split,
)


def mount(sub) -> None:
    p = sub.add_parser("directions", help="compute candidate directions and select one",
                       description="Example: abliterate directions ./model -o refusal.safetensors")
    add_options(p, DirectionsOptions)
    add_options(p, RunConfig, MODEL + PROMPTS + SELECT + STREAM + MAPPED + ("force",))
    p.set_defaults(func=directions)

    p = sub.add_parser("concept", help="a direction from any two contrastive prompt sets, for steering",
                       description="Example (built in): abliterate concept ./model --positive builtin:french:train "
                       "--negative builtin:english:train -o french.safetensors; then abliterate sweep ./model "
                       "--direction french.safetensors --prompts builtin:english:test --marker ' le ' --marker ' est '")
    add_options(p, ConceptOptions)
    add_options(p, RunConfig, MODEL + ("column", "n_train", "system_prompt", "plain_prompts", "projected", "seed",
                                              "force"))
    p.set_defaults(func=concept)


def directions(args) -> int:
    cfg = run_config(args)
    streamed = open_streamed(args.model, cfg)
    loaded, layout = (streamed.loaded, streamed.layout) if streamed else load(args.model, cfg)
    direction, cands, sel = find_direction(loaded, layout, cfg, streamed=streamed)
    if sel:
        print(selection_table(sel))
    path = direction.save(args.output, cands)
    print(f"direction: layer {direction.layer}, position {direction.position} -> {path}")
    return 0


def concept(args) -> int:
    cfg = run_config(args)
    loaded, layout = load(args.model, cfg)
    layer = args.layer if args.layer is not None else round(0.4 * layout.n_layers)
    pos, _ = split(load_prompts(args.positive, column=cfg.column), cfg.n_train, 0, cfg.seed)
    neg, _ = split(load_prompts(args.negative, column=cfg.column), cfg.n_train, 0, cfg.seed)
    cands = compute_candidates(loaded, chat_format(cfg), pos, neg, cfg)
    direction = cands.direction(layer, -1, cfg.projected)
    direction.meta.update(positive=args.positive, negative=args.negative)
    path = direction.save(args.output, cands)
    print(f"concept direction {args.negative} -> {args.positive}: layer {layer}, mean difference "
          f"{direction.scale:.2f} -> {path}")
    return 0
