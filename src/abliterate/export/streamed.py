"""Bake an edit into a safetensors checkpoint one shard at a time, never loading the model.

The in-memory bake (`apply`) loads the whole model, edits its residual writers and saves it, so
it needs memory for the whole model. This one reads the checkpoint's shards lazily (`safe_open`),
one after the other, and writes each shard under its own name tensor by tensor
(`export.files.TensorFileWriter`: the header first, then the data, since every name, dtype and
shape is known before any is made). A tensor the edit does not touch is copied in blocks of rows;
a writer whose residual axis is its last (an embedding, a Conv1D) is edited in the blocks of rows
the in-memory bake edits it in (`edit.weighted.WriterEdit.rows_`), as they are read; any other
writer (an (out, in) matrix, whose edit mixes its rows, or a parameter in pieces) is read and
edited whole by the in-memory bake's function (`WriterEdit.apply_`). The file is opened again
after every block read, so no more than a block of it is mapped. Peak memory: about the largest
writer edited whole plus a few blocks (`BLOCK_BYTES`), whatever the size of a shard or of the
embedding (docs/big-models.md).

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
(tests/test_export_streamed.py).

Not done here: the in-memory bake of one direction checks on a forward pass that no writer was
missed (`commands.steps.bake`); without a model there is no forward pass. Both paths take their
writers from the same layout, so a spec that misses one misses it in both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
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
from ..edit import weighted
from ..edit.weighted import Ablation, WriterEdit, untie_lm_head_, writer_edits
from ..errors import AbliterateError
from ..model.arch import ArchSpec, Layout, Writer, resolve
from ..model.load import check_loading_info, check_safetensors, finite, load_tokenizer, pick_device, pick_dtype
from .files import DTYPES, MANIFEST, TensorFileWriter, check_output, to_json, write_dir_atomic

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """A local safetensors checkpoint, from its files' headers: which shard holds each tensor, and its shape."""

    root: Path
    shards: list[str]  # file names, in order
    where: dict[str, str]  # tensor name -> shard file
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    sharded: bool  # written with an index (model.safetensors.index.json)

    @classmethod
    def open(cls, source: str | Path) -> Checkpoint:
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
        where, shapes, dtypes = {}, {}, {}
        for shard in shards:
            path = root / shard
            if not path.is_file():
                raise AbliterateError(f"{root / INDEX} names {shard}, which is not in {root}; re-download the model")
            check_safetensors(path)
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    where[name], shapes[name] = shard, tuple(sl.get_shape())
                    if sl.get_dtype() not in DTYPES:
                        raise AbliterateError(f"{path} holds {name} in dtype {sl.get_dtype()}, which torch does not "
                                              f"read; convert the checkpoint, or leave out --stream")
                    dtypes[name] = DTYPES[sl.get_dtype()]
        if listed is not None and listed != where:
            odd = sorted(set(listed.items()) ^ set(where.items()))
            raise AbliterateError(f"{root / INDEX} does not match its shards ({len(odd)} entries differ, e.g. "
                                  f"{odd[0][0]} in {odd[0][1]}); re-download or re-save the model")
        return cls(root, shards, where, shapes, dtypes, listed is not None)

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
    emb_name = stored(skel.model, emb.name, emb.param).names[0] if untied else None
    head_shard = skel.ckpt.where[emb_name] if untied else None
    ready: dict[str, torch.Tensor] = {}  # edited pieces of a parameter whose shard is still to come

    def pieces(read: _Rows, name: str, shard: str):
        """Output tensor `name` of `shard`, in pieces of at most about one block, in its order on disk."""
        if name in todo and name != head:
            writer, edit, where = todo[name]
            if not where.stacked and writer.param.dim() == 2 and writer.out_dim == 1:
                # residual axis last (an embedding, a Conv1D): edited in the blocks of rows `apply_` uses, as read
                rows = WriterEdit.block_rows(skel.ckpt.shapes[name][1])
                for i in range(0, skel.ckpt.shapes[name][0], rows):
                    raw = read(shard, name, i, i + rows)
                    block = _cast(raw, skel.dtype).to(skel.device)
                    if block is raw:  # safetensors maps the file: edited in place, a later read would see the edit
                        block = block.clone()
                    yield edit.rows_(block, i).cpu()
                return
            if name not in ready:  # a whole (out, in) matrix, or a parameter in pieces: edited whole
                w = _read(skel.ckpt, where, skel.dtype).to(skel.device)
                edited = edit.apply_(w, writer.out_dim).cpu()
                ready.update(zip(where.names, edited.unbind(0) if where.stacked else [edited]))
            yield ready.pop(name)
            return
        source = emb_name if name == head else name  # the untied head: the embedding as it was
        shape = skel.ckpt.shapes[source]
        if len(shape) < 1:
            yield _cast(read(skel.ckpt.where[source], source), skel.dtype)
            return
        rows = max(1, weighted.BLOCK_BYTES // (4 * max(1, math.prod(shape[1:]))))
        for i in range(0, shape[0], rows):
            yield _cast(read(skel.ckpt.where[source], source, i, i + rows), skel.dtype)

    def fill(tmp: Path) -> None:
        weight_map, size = {}, 0
        total = sum(math.prod(skel.ckpt.shapes[n]) * _out_dtype(skel, skel.ckpt.dtypes[n]).itemsize
                    for n in [*skel.ckpt.where, *([emb_name] if untied else [])])
        with tqdm(total=total, desc="streamed bake", leave=False, unit="B", unit_scale=True) as bar:
            for shard in skel.ckpt.shards:
                names = [n for n in skel.ckpt.where if skel.ckpt.where[n] == shard]
                names += [head] if shard == head_shard else []
                entries = {n: (_out_dtype(skel, skel.ckpt.dtypes[emb_name if n == head else n]),
                               skel.ckpt.shapes[emb_name if n == head else n]) for n in names}
                with _Rows(skel.ckpt.root) as read, TensorFileWriter(tmp / shard, entries, {"format": "pt"}) as f:
                    for name in f.order:
                        for piece in pieces(read, name, shard):
                            _check_finite(skel, name, piece)
                            f.write(name, piece)
                            bar.update(piece.nbytes)
                check_safetensors(tmp / shard)
                weight_map.update(dict.fromkeys(entries, shard))
                size += sum(f.sizes.values())
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


def _check_finite(skel: Skeleton, name: str, piece: torch.Tensor) -> None:
    """`load_model`'s check, piece by piece: a weight that is nan or inf (after the cast) is refused."""
    if not finite(piece):
        raise AbliterateError(
            f"the weights of {skel.ckpt.root} hold nan or inf in {name}; "
            + ("float16 cannot hold some of them: use --dtype bfloat16 or float32" if skel.dtype == torch.float16
               else "the checkpoint is damaged: re-download or re-save the model"))


def _out_dtype(skel: Skeleton, dtype: torch.dtype) -> torch.dtype:
    """A stored tensor's dtype in the output: `_cast`'s rule."""
    return skel.dtype if dtype.is_floating_point else dtype


class _Rows:
    """Rows of a checkpoint's tensors, read through `safe_open`. A file's pages count in the resident set while it
    is mapped, so a shard is closed and opened again after every `BLOCK_BYTES` read: what is mapped and touched
    stays about one block, whatever the size of the shard."""

    def __init__(self, root: Path):
        self.root, self.shard, self.file, self.since = root, None, None, 0

    def __call__(self, shard: str, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows `start:stop` of tensor `name` (all of it, for None), from file `shard`."""
        if shard != self.shard or self.since >= weighted.BLOCK_BYTES:
            self.close()
            self.file, self.shard, self.since = safe_open(str(self.root / shard), "pt"), shard, 0
            self.file.__enter__()
        t = self.file.get_tensor(name) if start is None else self.file.get_slice(name)[start:stop]
        self.since += t.nbytes
        return t

    def close(self) -> None:
        if self.file is not None:
            self.file.__exit__(None, None, None)
        self.shard = self.file = None

    def __enter__(self) -> _Rows:
        return self

    def __exit__(self, *_) -> None:
        self.close()


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
