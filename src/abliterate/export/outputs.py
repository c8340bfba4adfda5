"""A run's files: where a searched edit and its finalists are saved, the manifest reader for `apply --manifest`,
the output checks of a model output, and the GGUF output with its companions (NAME.*)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..config import RunConfig
from ..edit.steer import Steering
from ..edit.weighted import Ablation
from ..errors import AbliterateError
from ..find.directions import Candidates, Direction
from ..model.arch import Layout
from ..model.load import Loaded
from ..search.study import SearchResult
from .files import (
    ABLATION,
    CONTROL_VECTOR,
    DIRECTION,
    MANIFEST,
    REPORT,
    check_output,
    companion,
    finalist_file,
    read_manifest,
    to_json,
    write_file,
)
from .gguf_convert import check_convertible, write_gguf
from .gguf_copy import writable_types, write_edited_gguf
from .llamacpp import write_control_vector, write_modelfile


def edit_file(r: SearchResult, number: int, prefix: str = "") -> str:
    """Where checked trial `number`'s edit is saved, relative to the manifest (prefix: 'NAME.' beside a GGUF
    file): the chosen one in ABLATION, the other finalists under finalists/."""
    return prefix + (ABLATION if number == r.chosen.number else finalist_file(number))


def search_files(r: SearchResult, prefix: str = "") -> dict[str, Ablation]:
    """Every checked trial's edit, by the path it is saved at."""
    return {edit_file(r, n, prefix): ablation for n, ablation in r.ablations.items()}


def search_manifest(r: SearchResult, prefix: str = "") -> dict:
    """Everything needed to see and reproduce the choice: the edit's parameters and where its tensors are
    (the chosen edit's, and every finalist's for `apply --manifest --trial N`)."""
    checked = r.finalists + ([r.chosen] if r.chosen not in r.finalists else [])
    return {
        "chosen": asdict(r.chosen), "rule": r.rule, "ablation_file": edit_file(r, r.chosen.number, prefix),
        "front": r.table(),
        "finalists": [asdict(t) | {"ablation_file": edit_file(r, t.number, prefix)} for t in checked],
        "trials": len(r.trials),
        "baseline_refusals": r.baseline_refusals, "n_harmful": r.n_harmful, "n_harmless": r.n_harmless,
        "study": r.study, "wall_s": r.wall_s,
    }


def is_gguf(out: str | Path | None) -> bool:
    return out is not None and str(out).endswith(".gguf")


def check_model_output(out: str | Path, source: str | Path, force: bool, gguf_type: str | None = None) -> Path:
    """Before the model loads: a model output (a directory, or NAME.gguf) must not touch the input `source`; a
    Hugging Face model written as GGUF needs a `gguf_type` that can be written here."""
    src = Path(source).expanduser()
    if is_gguf(out) and gguf_type and not str(source).lower().endswith(".gguf"):
        if gguf_type.upper() not in writable_types():
            raise AbliterateError(f"--gguf-type {gguf_type} cannot be written here; writable: "
                                  f"{', '.join(writable_types())} (K-quants need llama-cpp-python)")
    return check_output(out, inputs=(src,) if src.exists() else (), force=force,
                        kind="file" if is_gguf(out) else "dir")


def check_loaded_output(out: str | Path, loaded: Loaded, force: bool) -> bool:
    """After the load: the same rule against what was loaded, and whether this model can be written as a new
    GGUF. True for a GGUF output."""
    if is_gguf(out) and loaded.gguf_file is None:
        check_convertible(loaded.model)  # a Hugging Face model written as a new GGUF
    check_output(out, inputs=loaded.inputs, force=force, kind="file" if is_gguf(out) else "dir")
    return is_gguf(out)


def save_gguf(loaded: Loaded, layout: Layout, out: str | Path, direction: Direction, edited: list[str],
              manifest: dict, cfg: RunConfig, cands: Candidates | None = None, report: str | None = None,
              ablation: Ablation | None = None, searched: SearchResult | None = None) -> Path:
    """Step 9 for a GGUF output: the edited copy of a GGUF input, or a Hugging Face model written whole
    (weights in `cfg.gguf_type`); then the companions next to it (NAME.*)."""
    if loaded.gguf_file is not None:
        summary = write_edited_gguf(loaded.gguf_file, out, loaded.model, layout, edited,
                                    fallback_type=cfg.gguf_fallback_type, force=cfg.force)
    else:
        summary = write_gguf(loaded.model, loaded.tokenizer, out, qtype=cfg.gguf_type, name=loaded.source,
                             force=cfg.force)
    path = Path(summary["path"])
    manifest["gguf"] = {k: v for k, v in summary.items() if k != "path"}
    stem = path.with_suffix("")
    direction.save(companion(path, DIRECTION), cands)
    if searched is not None:  # a run's search: every checked trial's edit
        manifest["search"] = search_manifest(searched, prefix=stem.name + ".")
        for rel, saved in search_files(searched, prefix=stem.name + ".").items():
            saved.save(stem.parent / rel)
    elif ablation is not None:  # an apply of a searched edit
        name = stem.name + "." + ABLATION
        ablation.save(stem.with_name(name))
        manifest["search"]["ablation_file"] = name
    write_file(companion(path, MANIFEST), to_json(manifest))
    if report is not None:
        write_file(companion(path, REPORT), report)
    write_modelfile(path, loaded.tokenizer)
    return path


def write_steering_extras(tmp: Path, steering: Steering, layout: Layout, report: str) -> None:
    """Beside a baked steering: the direction, the report and, where llama.cpp can express it, a control vector."""
    steering.direction.save(tmp / DIRECTION)
    (tmp / REPORT).write_text(report)
    if layout.spec.gguf_arch and min(steering.layers) >= 2:
        vectors = {layer: steering.vector() for layer in steering.layers}
        write_control_vector(tmp / CONTROL_VECTOR, vectors, layout)


def read_edit(path: Path, trial: int | None = None) -> tuple[Direction, Ablation | None, dict | None]:
    """The edit a run (or an apply) saved: its direction and, for a searched edit, its ablation (the chosen
    one's, or finalist `trial`'s), from the files beside the manifest."""

    manifest = read_manifest(path, ("run", "apply"))
    stem = path.name[: -len("manifest.json")] if path.name.endswith(".manifest.json") else ""
    try:
        search = manifest.get("search")
        file = str(search["ablation_file"]) if search else None
        saved = {t["number"]: t for t in (search or {}).get("finalists", []) if "ablation_file" in t}
    except (KeyError, TypeError, AttributeError) as e:
        raise AbliterateError(f"{path}: its search section is not one `run --search` writes ({type(e).__name__}: "
                              f"{e}); give the manifest.json of a run or an apply as it was saved") from e
    if trial is not None:
        if trial not in saved:
            raise AbliterateError(f"--trial {trial}: {path} has no saved edit for that trial; its finalists are "
                                  f"{', '.join(map(str, saved)) or 'none (not a searched run)'}")
        search = dict(search, chosen=saved[trial])
        file = str(saved[trial]["ablation_file"])
    ablation = Ablation.load(path.parent / file) if file else None
    return Direction.load(path.parent / f"{stem}{DIRECTION}"), ablation, search
