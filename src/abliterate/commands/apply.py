"""`abliterate apply`: bake a saved direction, or a run's exact edit, into a model; or write it as a LoRA adapter.

    1. read the edit (a direction file, or a run's manifest and the files beside it)
    2. check the output, load the model
    3. bake the edit (or build the adapter)
    4. save the model (directory or GGUF) with its manifest

With --stream, steps 2-4 never load the model: its skeleton (config and headers) is read, and the same edit is
baked into the checkpoint shard by shard (`export.streamed`).
"""

from __future__ import annotations

from pathlib import Path

import transformers

from ..config import ApplyOptions, RunConfig
from ..edit.project import plain
from ..edit.weighted import Ablation, apply_ablation_, edited_names
from ..errors import AbliterateError
from ..export.files import (
    ABLATION,
    DIRECTION,
    MANIFEST,
    check_output,
    manifest,
    read_manifest,
    to_json,
    write_dir_atomic,
)
from ..export.hf import save_model
from ..export.llamacpp import write_lora_gguf
from ..export.outputs import (
    check_loaded_output,
    check_model_output,
    is_gguf,
    read_edit,
    save_gguf,
)
from ..export.peft import save_lora_adapter
from ..find.directions import Direction
from ..show.tables import print_gguf
from .options import MODEL, SAVE, add_options, options, run_config
from .steps import bake, load


def mount(sub) -> None:
    p = sub.add_parser("apply", help="orthogonalize a model's weights against a saved direction, or redo a run's edit",
                       description="Examples: abliterate apply ./model --direction refusal.safetensors -o ./out; "
                       "abliterate apply ./model --manifest ./searched/manifest.json -o ./again (the same weights, "
                       "bit for bit)")
    add_options(p, ApplyOptions)
    add_options(p, RunConfig, MODEL + SAVE)
    p.set_defaults(func=command)


def command(args) -> int:
    cfg, opt = run_config(args), options(args, ApplyOptions)
    if (opt.direction is None) == (opt.manifest is None):
        raise AbliterateError("give exactly one of --direction FILE and --manifest FILE")
    if opt.trial is not None and not opt.manifest:
        raise AbliterateError("--trial picks a finalist of a searched run: give its --manifest too")
    if opt.manifest and opt.adapter:
        raise AbliterateError("--adapter takes --direction; a manifest's edit is applied to the whole model")
    if opt.stream:
        check_stream(opt)
    ablation = search = None
    if opt.manifest:
        direction, ablation, search = read_edit(Path(opt.manifest), opt.trial)
    else:
        direction = Direction.load(opt.direction)
    if opt.adapter:
        check_output(opt.output, inputs=(Path(opt.model).expanduser(),), force=cfg.force,
                     kind="file" if is_gguf(opt.output) else "dir")
    else:
        check_model_output(opt.output, opt.model, cfg.force, cfg.gguf_type)
    if opt.stream:
        return stream(opt, cfg, direction, ablation, search)
    loaded, layout = load(opt.model, cfg)
    direction.check_model(layout.hidden_size, layout.n_layers)
    if opt.adapter and is_gguf(opt.output):
        path = write_lora_gguf(opt.output, layout, direction, base=opt.model, force=cfg.force)
        print(f"llama.cpp LoRA adapter saved to {path}; use it with: llama-cli -m MODEL.gguf --lora {path}")
        return 0
    if opt.adapter:
        out = check_output(opt.output, inputs=loaded.inputs, force=cfg.force)
        info = manifest("adapter", opt.model, direction=direction.describe())

        def fill(tmp: Path) -> None:
            save_lora_adapter(loaded.model, layout, direction, tmp, base=opt.model)
            (tmp / MANIFEST).write_text(to_json(info))
            direction.save(tmp / DIRECTION)

        write_dir_atomic(out, fill, cfg.force)
        print(f"PEFT LoRA adapter (rank 1 per writer) saved to {out}; load it with "
              f"PeftModel.from_pretrained(base_model, '{out}')")
        return 0
    to_gguf = check_loaded_output(opt.output, loaded, cfg.force)
    edited = apply_ablation_(loaded.model, ablation, layout) if ablation else bake(loaded, layout, direction)
    info = apply_manifest(opt, direction, edited, search)
    if to_gguf:
        print_gguf(save_gguf(loaded, layout, opt.output, direction, edited, info, cfg, ablation=ablation), info)
        return 0
    out = save_model(loaded, opt.output, manifest=info, shard_size=cfg.shard_size, force=cfg.force,
                     extra=edit_files(direction, ablation))
    print(f"saved to {out} (baked in memory)" + (f"; the edit of {opt.manifest}" if opt.manifest else ""))
    return 0


def check_stream(opt: ApplyOptions) -> None:
    """Before any work: --stream reads a Hugging Face directory of safetensors and writes one, whole."""
    if opt.adapter:
        raise AbliterateError("--stream bakes the edit into a whole model and --adapter writes an adapter instead; "
                              "give one of them")
    if str(opt.model).lower().endswith(".gguf"):
        raise AbliterateError(f"--stream reads safetensors shards and {opt.model} is a GGUF file: leave out --stream "
                              f"(a GGUF input is copied with only the edited tensors replaced)")
    if is_gguf(opt.output):
        raise AbliterateError(f"--stream writes a Hugging Face directory, not {opt.output}: leave out --stream, or "
                              f"stream into a directory and convert that (abliterate convert DIR -o {opt.output})")


def stream(opt: ApplyOptions, cfg: RunConfig, direction: Direction, ablation: Ablation | None,
           search: dict | None) -> int:
    """Steps 2-4 with --stream: the checkpoint's skeleton, then the edit the in-memory path would bake (the
    manifest's ablation, or plain abliteration by the direction), written shard by shard."""
    try:  # only --stream needs transformers' internal key conversions
        from ..export.streamed import open_skeleton, save_streamed
    except ImportError as e:
        raise AbliterateError(f"--stream names tensors through transformers' internal key conversions, which "
                              f"transformers {transformers.__version__} lacks ({e}); upgrade transformers (tested "
                              f"with 5.24) or leave out --stream") from e
    skel = open_skeleton(opt.model, cfg)
    direction.check_model(skel.layout.hidden_size, skel.layout.n_layers)
    edit = ablation if ablation is not None else plain(direction, skel.layout.n_layers)
    info = apply_manifest(opt, direction, edited_names(edit, skel.layout), search) | {"streamed": True}
    out = save_streamed(skel, edit, opt.output, manifest=info, extra=edit_files(direction, ablation), force=cfg.force)
    print(f"saved to {out} (baked shard by shard, {len(skel.ckpt.shards)} shard(s) in {str(skel.dtype)[6:]}, the "
          f"model never loaded whole)" + (f"; the edit of {opt.manifest}" if opt.manifest else ""))
    return 0


def apply_manifest(opt: ApplyOptions, direction: Direction, edited: list[str], search: dict | None) -> dict:
    info = manifest("apply", opt.model, direction=direction.describe(), edited_tensors=edited)
    if opt.manifest:
        info["from_manifest"] = str(opt.manifest)
        # the same edit, fitted and selected on the same prompts: eval checks its report set against them
        info["splits"] = read_manifest(Path(opt.manifest), ("run", "apply")).get("splits")
    if search:
        info["search"] = {"chosen": search["chosen"], "ablation_file": ABLATION}
    return info


def edit_files(direction: Direction, ablation: Ablation | None):
    """What a model output keeps of its edit, beside the weights: the direction, and a searched edit's ablation."""

    def fill(tmp: Path) -> None:
        direction.save(tmp / DIRECTION)
        if ablation is not None:
            ablation.save(tmp / ABLATION)
    return fill
