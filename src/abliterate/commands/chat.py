"""`abliterate chat`: the original and the edited model answer side by side, streamed.

    1. what to compare: an output and its original (from its manifest), two models, or hooks on one model
    2. load  3. one message (--prompt) or an interactive session
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ChatOptions, RunConfig
from ..edit.project import ablated
from ..edit.steer import Steering, parse_layers, steered
from ..errors import AbliterateError
from ..export.files import MANIFEST, read_manifest
from ..find.directions import Direction
from ..show.chat import Speaker, interactive, one_shot
from .options import FORMAT, MODEL, add_options, run_config
from .steps import chat_format, load


def cmd_chat(args) -> int:

    cfg = run_config(args)
    fmt = chat_format(cfg)
    if args.max_new_tokens < 1:
        raise AbliterateError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.prompt is not None and not args.prompt.strip():
        raise AbliterateError("the prompt is empty; give some text with --prompt")
    original = args.original
    manifest = Path(args.model) / MANIFEST
    if args.direction is None and original is None:
        if not manifest.is_file():
            raise AbliterateError(
                f"nothing to compare {args.model} with: give --direction FILE (hooks on this model), "
                f"--original MODEL, or an abliterate output directory (it names its original in manifest.json)")
        original = str(read_manifest(manifest, ("run", "apply", "induce", "steer"))["model"])
    if args.direction is not None and args.original is not None:
        raise AbliterateError("give --direction (hooks on MODEL) or --original (two models), not both")
    loaded, layout = load(args.model, cfg)
    if args.direction is not None:
        direction = Direction.load(args.direction)
        direction.check_model(layout.hidden_size, layout.n_layers)
        if args.strength is None:
            edit, label = (lambda: ablated(loaded.model, direction, layout)), "ablated"
        else:
            layers = parse_layers(args.layers) if args.layers else (direction.layer,)
            steering = Steering(direction, args.strength, layers).check(layout)
            edit, label = (lambda: steered(loaded.model, steering, layout)), f"steered x{args.strength:g}"
        speakers = [Speaker("original", loaded.model, loaded.tokenizer, fmt),
                    Speaker(label, loaded.model, loaded.tokenizer, fmt, context=edit)]
    else:
        base, _ = load(original, cfg)
        speakers = [Speaker(f"original ({original})", base.model, base.tokenizer, fmt),
                    Speaker(f"edited ({args.model})", loaded.model, loaded.tokenizer, fmt)]
    if args.prompt is None:
        interactive(speakers, args.max_new_tokens)
        return 0
    answers = one_shot(speakers, args.prompt, args.max_new_tokens)
    if args.json:
        print(json.dumps({"prompt": args.prompt, **{s.name: a for s, a in zip(speakers, answers)}}, indent=2))
    else:
        for s, a in zip(speakers, answers):
            print(f"--- {s.name}\n{a}\n")
    return 0


def mount(sub) -> None:
    p = sub.add_parser("chat", help="chat with the original and the edited model side by side",
                       description="MODEL is an abliterate output (its original comes from manifest.json), or "
                       "any model with --original, or a model with --direction (ablated by hooks; with "
                       "--strength, added instead). Examples: abliterate chat ./out; abliterate chat ./model "
                       "--direction refusal.safetensors --prompt 'How do I pick a lock?'")
    add_options(p, ChatOptions)
    add_options(p, RunConfig, MODEL + FORMAT)
    p.set_defaults(func=cmd_chat)
