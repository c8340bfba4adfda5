"""Bake an edit into a safetensors checkpoint one shard at a time, never loading the model.

The in-memory bake (`apply`) loads the whole model, edits its residual writers and saves it, so
it needs memory for the whole model. This one reads the checkpoint's shards lazily (`safe_open`),
one after the other: a tensor the edit does not touch is copied, a writer's tensor is edited by
the function the in-memory bake uses (`edit.weighted.WriterEdit`), and each shard is written under
its own name before the next one is read. Peak memory: about one shard (as written, in the output
dtype) plus one edited tensor in float32 (docs/big-models.md).

What the model is comes from a skeleton: the model built from its config on the meta device (no
memory) and resolved by `model.arch` as a loaded one is. Its 1-D parameters (norms, biases: a few
MB even at 70B) are read for real, since Gemma's post-norm scales enter the edit. Names:
transformers keeps some parameters under other names, or whole where the file has pieces (fused
MoE experts are one (experts, H, I) parameter in the model and one tensor per expert on disk).
`revert_weight_conversion`, what `save_pretrained` uses, gives each parameter's names on disk; a
parameter in pieces is stacked as the loader stacks it (torch.stack on the first axis), edited
whole, and split again as the saver splits it.

Dtypes, as in the in-memory path: `from_pretrained` casts every floating-point tensor to the load
dtype (`--dtype`; auto is float32 on a CPU, bf16 or fp16 on a GPU) and `save_pretrained` writes
them in it. Here too: a tensor already in that dtype is copied as it is (the same bytes), another
floating-point one is cast as the loader casts it (`Tensor.to`). The edit runs on the same device
(`--device`). So with the same options the output's tensors are the in-memory bake's bit for bit
(tests/test_streamed.py).

Not done here: the in-memory bake of one direction checks on a forward pass that no writer was
missed (`commands.steps.bake`); without a model there is no forward pass. Both paths take their
writers from the same layout, so a spec that misses one misses it in both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

# transformers' loader and saver name tensors through these (internal: `commands.apply` imports this module only
# for --stream, and says what to do where they are missing)
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)

from ..config import RunConfig
from ..edit.weighted import Ablation, WriterEdit, untie_lm_head_, writer_edits
from ..errors import AbliterateError
from ..model.arch import ArchSpec, Layout, Writer, resolve
from ..model.load import check_loading_info, check_safetensors, finite, load_tokenizer, pick_device, pick_dtype
from .files import MANIFEST, check_output, to_json, write_dir_atomic

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """A local safetensors checkpoint, from its files' headers: which shard holds each tensor, and its shape."""

    root: Path
    shards: list[str]  # file names, in order
    where: dict[str, str]  # tensor name -> shard file
    shapes: dict[str, tuple[int, ...]]
    sharded: bool  # written with an index (model.safetensors.index.json)

    @classmethod
    def open(cls, source: str | Path) -> "Checkpoint":
        """The checkpoint in directory `source`; an error naming the fix if there is none, or if the index and
        the files disagree."""
        root = Path(source).expanduser()
        if root.is_file():
            raise AbliterateError(f"--stream reads a Hugging Face model directory of safetensors weights; {source} "
                                  f"is a file: leave out --stream (a GGUF is edited as a copy of itself)")
        if not root.is_dir():
            raise AbliterateError(f"--stream reads a local model directory; {source} is not one. Download it first "
                                  f"(hf download {source} --local-dir DIR) and stream from DIR, or leave out --stream")
        if not (root / "config.json").is_file():
            raise AbliterateError(f"{source} has no config.json, so it is not a Hugging Face model directory; give "
                                  f"the directory that holds config.json and the weights")
        if (root / INDEX).is_file():
            try:
                listed = dict(json.loads((root / INDEX).read_text())["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise AbliterateError(f"{root / INDEX} is not a safetensors index ({type(e).__name__}: {e}); "
                                      f"re-download or re-save the model") from e
            shards = sorted(set(map(str, listed.values())))
        elif (root / SINGLE).is_file():
            listed, shards = None, [SINGLE]
        else:
            raise AbliterateError(f"{source} has no {SINGLE} or {INDEX}; --stream reads only safetensors weights: "
                                  f"convert them, or leave out --stream")
        where, shapes = {}, {}
        for shard in shards:
            path = root / shard
            if not path.is_file():
                raise AbliterateError(f"{root / INDEX} names {shard}, which is not in {root}; re-download the model")
            check_safetensors(path)
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    where[name], shapes[name] = shard, tuple(f.get_slice(name).get_shape())
        if listed is not None and listed != where:
            odd = sorted(set(listed.items()) ^ set(where.items()))
            raise AbliterateError(f"{root / INDEX} does not match its shards ({len(odd)} entries differ, e.g. "
                                  f"{odd[0][0]} in {odd[0][1]}); re-download or re-save the model")
        return cls(root, shards, where, shapes, listed is not None)

    def read(self, names: list[str]) -> list[torch.Tensor]:
        """Tensors `names`, in order, each shard opened once."""
        out = {}
        for shard in dict.fromkeys(self.where[n] for n in names):
            with safe_open(str(self.root / shard), "pt") as f:
                out.update({n: f.get_tensor(n) for n in names if self.where[n] == shard})
        return [out[n] for n in names]


@dataclass
class Stored:
    """Where one model parameter is on disk: under one name, or in pieces along its first axis (fused experts)."""

    names: list[str]
    stacked: bool


def stored(model: nn.Module, name: str, param: torch.Tensor) -> Stored:
    """The disk names `save_pretrained` gives parameter `name`. Only renames and splits on the first axis are
    undone here; for another conversion the error says to leave out --stream."""
    pieces = revert_weight_conversion(model, {name: param})
    views = list(pieces.values())
    if len(views) == 1 and _is_slice(views[0], param, None):
        return Stored(list(pieces), stacked=False)
    if len(views) == param.shape[0] and all(_is_slice(v, param, i) for i, v in enumerate(views)):
        return Stored(list(pieces), stacked=True)
    raise AbliterateError(f"transformers stores {name} {tuple(param.shape)} on disk as {len(views)} tensor(s) "
                          f"({', '.join(list(pieces)[:2])}, ...) in a way the streamed bake does not undo; leave out "
                          f"--stream")


def _is_slice(view: torch.Tensor, param: torch.Tensor, i: int | None) -> bool:
    """`view` is `param` itself (i None) or `param[i]`, by shape, strides and offset (a meta tensor has them too)."""
    base = param if i is None else param[i]
    return (view.shape == base.shape and view.stride() == base.stride()
            and view.storage_offset() == base.storage_offset())


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """As `from_pretrained` loads a tensor in `dtype`: floating-point ones cast, the rest as they are."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _read(ckpt: Checkpoint, where: Stored, dtype: torch.dtype) -> torch.Tensor:
    """One parameter as the loader makes it: in `dtype`, its pieces stacked, on the CPU."""
    pieces = [_cast(t, dtype) for t in ckpt.read(where.names)]
    return torch.stack(pieces) if where.stacked else pieces[0]


@dataclass
class Skeleton:
    """A checkpoint's model without its weights (on the meta device, but for its real 1-D parameters), its
    layout, its tokenizer, and the dtype and device the in-memory path would load it in."""

    ckpt: Checkpoint
    model: nn.Module
    layout: Layout
    tokenizer: object
    dtype: torch.dtype
    device: torch.device

    def read(self, name: str, param: torch.Tensor) -> torch.Tensor:
        return _read(self.ckpt, stored(self.model, name, param), self.dtype)

    def matrix(self, writer: Writer) -> torch.Tensor:
        """A writer's weights where the edit runs (for the norm-preserving scales)."""
        return self.read(writer.name, writer.param).to(self.device)


def open_skeleton(source: str | Path, cfg: RunConfig) -> Skeleton:
    """The skeleton of the checkpoint in directory `source`, checked as `load_model` checks a load: the checkpoint
    fills the model exactly, no tensor missing, extra or of the wrong shape. Reads headers, the config, the
    tokenizer and the 1-D tensors only."""
    ckpt = Checkpoint.open(source)
    device = pick_device(cfg.device)
    dtype = pick_dtype(device, cfg.dtype)
    try:
        config = AutoConfig.from_pretrained(ckpt.root, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        tokenizer = load_tokenizer(str(ckpt.root), cfg.trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AbliterateError(f"could not read the model of {source} ({first[:300]}); check that it is a complete "
                              f"Hugging Face model directory") from e
    fp32 = set(model._keep_in_fp32_modules or ()) if dtype == torch.float16 else set()
    fp32 |= set(model._keep_in_fp32_modules_strict or ()) if dtype in (torch.float16, torch.bfloat16) else set()
    if fp32:
        raise AbliterateError(f"{type(model).__name__} keeps {', '.join(sorted(fp32))} in float32 when loaded in "
                              f"{dtype}; the streamed bake does not: pass --dtype float32, or leave out --stream")
    _as_loaded(model, list(ckpt.where))
    _check_fills(source, ckpt, model)
    small = {n: _read(ckpt, stored(model, n, p), dtype) for n, p in model.named_parameters() if p.dim() <= 1}
    model.load_state_dict(small, strict=False, assign=True)
    layout = resolve(model, ArchSpec.from_json(cfg.arch_spec) if cfg.arch_spec else None)
    return Skeleton(ckpt, model, layout, tokenizer, dtype, device)


def _as_loaded(model: nn.Module, keys: list[str]) -> None:
    """In place: give the skeleton the key conversions a load of `keys` uses, as `from_pretrained` records them
    (`convert_and_load_state_dict_in_model`: every checkpoint key renamed in natural order; the conversions that
    matched kept in `_weight_conversions`). Saving reverts only those, so the names below are the in-memory path's:
    an old layout stays old, a tied head keeps its model name."""
    mapping = get_model_conversion_mapping(model)
    renamings = [c for c in mapping if isinstance(c, WeightRenaming)]
    converters = [c for c in mapping if isinstance(c, WeightConverter)]
    meta = model.state_dict()
    for key in sorted(keys, key=dot_natural_key):
        rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
    model._weight_conversions = [c for c in mapping if c.was_used()]


def _check_fills(source, ckpt: Checkpoint, model: nn.Module) -> None:
    """`load_model`'s rule for what the checkpoint holds, by the names the saver gives the model's tensors (a tied
    head's second name is not saved, so it is not looked for)."""
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    state = {n: t for n, t in model.state_dict().items() if n in own}
    expected = {n: tuple(t.shape) for n, t in revert_weight_conversion(model, state).items()}
    info = {
        "missing_keys": sorted(set(expected) - set(ckpt.where)),
        "unexpected_keys": sorted(set(ckpt.where) - set(expected)),
        "mismatched_keys": [(n, ckpt.shapes[n], expected[n]) for n in sorted(set(expected) & set(ckpt.where))
                            if ckpt.shapes[n] != expected[n]],
    }
    try:
        check_loading_info(str(source), model, info)
    except AbliterateError as e:
        raise AbliterateError(f"{e} (names as this transformers saves them: an older layout loads without "
                              f"--stream)") from e


def save_streamed(skel: Skeleton, ablation: Ablation, out: str | Path, *, manifest: dict, extra=None,
                  force: bool = False) -> Path:
    """Write `skel`'s checkpoint with `ablation` baked in to `out`, shard by shard, atomically; with the config,
    generation config, tokenizer and `manifest.json` as `export.hf.save_model` writes them, and `extra(tmp_dir)`.
    Unties `skel`'s head in place when the embedding is edited, as `apply_ablation_` does to a model.

    The shards keep the input's names and contents (--shard-size does not apply); a tied head,
    untied because the embedding is edited, joins the embedding's shard.
    """
    out = check_output(out, inputs=(skel.ckpt.root,), force=force)
    untied = bool(ablation.embed) and untie_lm_head_(skel.model, skel.layout)  # as apply_ablation_ does
    todo: dict[str, tuple[Writer, WriterEdit, Stored]] = {}  # disk name -> its writer
    for writers, edit in writer_edits(ablation, skel.layout, matrix=skel.matrix):
        for w in writers:
            where = stored(skel.model, w.name, w.param)
            todo.update(dict.fromkeys(where.names, (w, edit, where)))
    emb = skel.layout.embeddings[0] if untied else None
    head = stored(skel.model, f"{skel.layout.spec.lm_head}.weight", skel.layout.lm_head.weight).names[0] \
        if untied else None
    head_shard = skel.ckpt.where[stored(skel.model, emb.name, emb.param).names[0]] if untied else None

    def fill(tmp: Path) -> None:
        weight_map, size = {}, 0
        ready: dict[str, torch.Tensor] = {}  # edited tensors (or pieces) whose shard is still to come
        for shard in tqdm(skel.ckpt.shards, desc="streamed bake", leave=False, unit="shard"):
            tensors = {}
            with safe_open(str(skel.ckpt.root / shard), "pt") as f:
                for name in f.keys():
                    if name in todo and name not in ready:
                        writer, edit, where = todo[name]
                        w = _read(skel.ckpt, where, skel.dtype)
                        if writer is emb:
                            ready[head] = w  # the untied head keeps the embedding as it was
                        w = w.to(skel.device)  # edited in place, but for the untied head's original
                        edited = (edit(w, writer.out_dim) if writer is emb else edit.apply_(w, writer.out_dim)).cpu()
                        ready.update(zip(where.names, edited.unbind(0) if where.stacked else [edited]))
                    tensors[name] = ready.pop(name) if name in ready else _cast(f.get_tensor(name), skel.dtype)
            if shard == head_shard:
                tensors[head] = ready.pop(head)
            _check_finite(skel, tensors)
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
            size += sum(t.nbytes for t in tensors.values())
            del tensors
        assert not ready, f"edited but not written: {sorted(ready)}"
        if skel.ckpt.sharded:
            index = {"metadata": {"total_parameters": skel.model.num_parameters(), "total_size": size},
                     "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _save_configs(skel, tmp)
        if extra is not None:  # before the manifest: `run --stream` evaluates the written model here and fills it in
            extra(tmp)
        (tmp / MANIFEST).write_text(to_json(manifest))

    return write_dir_atomic(out, fill, force)


def _check_finite(skel: Skeleton, tensors: dict[str, torch.Tensor]) -> None:
    """`load_model`'s check, shard by shard: a weight that is nan or inf (after the cast) is refused."""
    bad = sorted(n for n, t in tensors.items() if not finite(t))
    if bad:
        raise AbliterateError(
            f"the weights of {skel.ckpt.root} hold nan or inf in {len(bad)} tensor(s) ({', '.join(bad[:4])}); "
            + ("float16 cannot hold some of them: use --dtype bfloat16 or float32" if skel.dtype == torch.float16
               else "the checkpoint is damaged: re-download or re-save the model"))


def _save_configs(skel: Skeleton, tmp: Path) -> None:
    """config.json, generation_config.json and the tokenizer, as `save_pretrained` writes them for a model that
    `load_model` loaded (its dtype and class in the config; the generation config read as `from_pretrained` does)."""
    model = skel.model
    model.config.dtype = str(skel.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    if model.can_generate():
        try:
            gen = GenerationConfig.from_pretrained(skel.ckpt.root)
        except OSError:  # no generation_config.json: made from config.json, as from_pretrained falls back
            gen = GenerationConfig.from_pretrained(skel.ckpt.root, config_file_name="config.json",
                                                   _from_model_config=True)
        gen.save_pretrained(tmp)
    skel.tokenizer.save_pretrained(tmp)
