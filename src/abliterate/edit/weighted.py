"""A weighted ablation: remove a k-dimensional subspace from each residual writer, by a weight per writer.

`edit.orthogonalize_` removes one direction from every writer, fully. The search
(`search.py`) tunes a richer edit, resolved here into tensors:

- a basis per block (k orthonormal rows; the same in every block or each block's own),
- a weight per block and component (attention, MLP) and one for the embeddings:
  a writer's output y becomes y - w (y U^T) U, which for weights W is W' = W - w U^T U W
  (w = 1 is orthogonalization; w > 1 overshoots, for heavily tuned models);
- optional norm preservation, a fixed scale per output coordinate ("row": each row of
  an (out, in) matrix keeps its norm, as in Heretic) or per input feature ("column":
  each vector the writer can add to the stream keeps its norm, as in grimjim's
  norm-preserving biprojection). Both are fixed diagonal scales, so a trial can run
  them as hooks: column scales the writer's input, row scales its output.

Hooks and baked weights give the same logits for plain writers (a Linear, Conv1D or
embedding that writes the stream directly). Gemma's post-norm writers and fused MoE
experts are baked against the direction seen through the norm (as in `edit.py`), so
there the hooks used in a trial approximate the bake; norm preservation is refused there.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import AbliterateError
from ..export.files import load_tensors, save_tensors
from ..model.arch import Layout, Writer, text_config
from ..model.forward import first_param, input_device

# The bake edits a writer in blocks of rows of at most this many float32 bytes (`WriterEdit.apply_`).
BLOCK_BYTES = 64 << 20

NORM_MODES = ("none", "row", "column")


@dataclass
class Ablation:
    """The resolved edit. Shapes: bases (L, k, H), attn and mlp (L,), embed_basis (k, H)."""

    bases: torch.Tensor  # float32, orthonormal rows per block
    attn: torch.Tensor  # float32 weight per block
    mlp: torch.Tensor
    embed_basis: torch.Tensor
    embed: float = 0.0
    norm: str = "none"
    params: dict = field(default_factory=dict)  # the search parameters it was made from

    def __post_init__(self):
        L, k, H = self.bases.shape
        assert self.attn.shape == (L,) and self.mlp.shape == (L,) and self.embed_basis.shape == (k, H)
        assert torch.isfinite(self.bases).all() and torch.isfinite(self.embed_basis).all()
        if self.norm not in NORM_MODES:
            raise AbliterateError(f"norm preservation {self.norm!r} is not one of {', '.join(NORM_MODES)}")

    @property
    def n_layers(self) -> int:
        return self.bases.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.bases.shape[2]

    def check(self, layout: Layout) -> None:
        if (self.n_layers, self.hidden_size) != (layout.n_layers, layout.hidden_size):
            raise AbliterateError(
                f"ablation is for {self.n_layers} layers of width {self.hidden_size}, the model has "
                f"{layout.n_layers} of width {layout.hidden_size}; it was made for another model"
            )
        if self.norm != "none":
            plain_writers(layout)

    def save(self, path: str | Path) -> Path:
        return save_tensors(path, {"bases": self.bases, "attn": self.attn, "mlp": self.mlp,
                                   "embed_basis": self.embed_basis},
                            {"abliterate.ablation": {"embed": self.embed, "norm": self.norm, "params": self.params}})

    @classmethod
    def load(cls, path: str | Path) -> "Ablation":
        info, t, _ = load_tensors(path, "abliterate.ablation", ("bases", "attn", "mlp", "embed_basis"), "ablation")
        try:
            return cls(**{k: v.float() for k, v in t.items()}, embed=float(info["embed"]), norm=str(info["norm"]),
                       params=dict(info["params"]))
        except (KeyError, TypeError, ValueError, AssertionError) as e:  # wrong metadata or shapes
            raise AbliterateError(f"{path} is not a usable abliterate ablation file ({type(e).__name__}: {e}); "
                                  f"save it again with `abliterate run --search` or `apply --manifest`") from e


def _matrix(writers: list[Writer]) -> Writer:
    return next(w for w in writers if w.param.dim() >= 2)


def plain_writers(layout: Layout) -> None:
    """Norm preservation needs writers whose hook module is the writer itself (no post-norm, no fused experts)."""
    for block in layout.blocks:
        for writers, hook in ((block.attn, block.attn_hook), (block.mlp, block.mlp_hook)):
            mats = [w for w in writers if w.param.dim() >= 2]
            if len(mats) != 1 or getattr(hook, "weight", None) is not mats[0].param or mats[0].param.dim() != 2:
                raise AbliterateError(
                    f"norm preservation needs one plain writer per component; block {block.index} has "
                    f"{[w.name for w in writers]} behind a {type(hook).__name__}. Use norm 'none' for this model"
                )


def _groups(ablation: Ablation, layout: Layout):
    """(hook module, its writers, basis, weight, post-norm scale) for every component with a non-zero weight."""
    out = []
    if ablation.embed:
        for w, m in zip(layout.embeddings, layout.embedding_modules):
            out.append((m, [w], ablation.embed_basis, float(ablation.embed), None))
    for i, block in enumerate(layout.blocks):
        for writers, hook, weight, scale in ((block.attn, block.attn_hook, ablation.attn[i], block.attn_scale),
                                             (block.mlp, block.mlp_hook, ablation.mlp[i], block.mlp_scale)):
            if float(weight) != 0.0:
                out.append((hook, writers, ablation.bases[i], float(weight), scale))
    return out


def project(x: torch.Tensor, basis: torch.Tensor, weight: float) -> torch.Tensor:
    """x - weight * (x U^T) U over the last axis; basis U is (k, H) with orthonormal rows."""
    return x - weight * (x @ basis.T) @ basis


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` as float32 in memory of its own. A matrix product's last bits depend on where its operand starts (on an
    AVX-512 CPU, rows that start 8 bytes past a 64-byte boundary are summed in another order), and a tensor read
    from a safetensors file starts wherever the file put it (8-byte aligned); torch's allocator aligns to 64. So
    both bakes compute on a copy, and the streamed one writes the in-memory one's bits whatever the file."""
    return t.to(torch.float32, copy=True)


def _norm_scales(writer: Writer, basis: torch.Tensor, weight: float, mode: str) -> torch.Tensor:
    """The fixed scale that gives the edited weight back its original norms: (H,) for rows, (in,) for columns.

    For an (out, in) matrix, "row" keeps each output coordinate's norm over the inputs,
    "column" keeps the norm of each input feature's written vector. Embeddings are
    (tokens, H): a column is one token's embedding.
    """
    wm = _aligned(writer.param.data.movedim(writer.out_dim, -1))  # (..., H)
    wm = wm.reshape(-1, wm.shape[-1])  # (in, H)
    edited = project(wm, basis.to(wm.device), weight)
    axis = 0 if mode == "row" else 1
    return (wm.norm(dim=axis) / edited.norm(dim=axis).clamp_min(1e-12)).nan_to_num(1.0)


@contextmanager
def ablating(model: nn.Module, ablation: Ablation, layout: Layout):
    """Within the block, `model` runs with `ablation` applied by hooks. Weights untouched; hooks removed on exit.

    Each hook works on the device its module's output comes out on (a device-mapped model's blocks sit on several:
    `model.mapped`), with its basis and scales copied there once."""
    ablation.check(layout)
    param = first_param(model)
    device = input_device(model)  # not the meta device of a model offloaded whole
    handles = []
    try:
        for module, writers, basis, weight, _ in _groups(ablation, layout):
            u = _Placed(basis.to(device, param.dtype))
            row = col = None
            if ablation.norm != "none" and any(w.param.is_meta for w in writers):
                raise AbliterateError(f"the norm-preserving ablation ({ablation.norm}) needs the weights of "
                                      f"{writers[0].name}, which are offloaded (--device-map); run it where the "
                                      f"model fits the devices, or choose an edit without norm preservation")
            if ablation.norm == "row":
                row = _Placed(_norm_scales(_matrix(writers), basis, weight, "row").to(device, param.dtype))
            elif ablation.norm == "column":
                col = _Placed(_norm_scales(_matrix(writers), basis, weight, "column").to(device, param.dtype))
            handles.append(module.register_forward_hook(_output_hook(u, weight, row, col, module)))
            if col is not None and not isinstance(module, nn.Embedding):
                handles.append(module.register_forward_pre_hook(_input_hook(col)))
        yield model
    finally:
        for h in handles:
            h.remove()


class _Placed:
    """A tensor and its copies on the devices asked for (`at(device)`), each made once."""

    def __init__(self, t: torch.Tensor):
        self.copies = {t.device: t}
        self.first = t

    def at(self, device: torch.device) -> torch.Tensor:
        if device not in self.copies:
            self.copies[device] = self.first.to(device)
        return self.copies[device]


def _output_hook(u: _Placed, weight, row: _Placed | None, col: _Placed | None, module):
    embedding = isinstance(module, nn.Embedding)

    def hook(mod, args, output):
        y = output[0] if isinstance(output, tuple) else output
        if col is not None and embedding:  # a column of an embedding is one token's vector
            y = y * col.at(y.device)[args[0].to(y.device)].unsqueeze(-1)
        y = project(y, u.at(y.device), weight)
        if row is not None:
            y = y * row.at(y.device)
        return (y,) + output[1:] if isinstance(output, tuple) else y
    return hook


def _input_hook(col: _Placed):
    def hook(mod, args):
        return (args[0] * col.at(args[0].device),) + args[1:]
    return hook


@dataclass
class WriterEdit:
    """What the bake does to every writer of one component: W' = W - w U^T U W along the residual axis, then the
    norm-preserving scale. One function for every writer's tensor, so a bake in memory (`apply_ablation_`) and one
    that streams the checkpoint's shards (`export.streamed`) write the same bits."""

    basis: torch.Tensor  # (k, H) float32, orthonormal; behind a post-norm, the basis seen through its scale
    weight: float
    norm: str = "none"
    scales: torch.Tensor | None = None  # (H,) for "row", (in,) for "column"; from the component's matrix

    def __call__(self, w: torch.Tensor, out_dim: int) -> torch.Tensor:
        """`w` edited, as a new tensor (`apply_` on a copy)."""
        return self.apply_(w.clone(), out_dim)

    def apply_(self, w: torch.Tensor, out_dim: int) -> torch.Tensor:
        """In place: `w` edited (`out_dim`: its residual axis), computed in float32 on `w`'s device in blocks of
        rows of at most `BLOCK_BYTES`, each cast to `w`'s dtype as it is written back. The blocks bound the
        bake's extra memory to one block whatever the tensor (a 150k-token embedding is 545 MB in float32);
        both bakes call this, so they write the same bits."""
        wm = w.movedim(out_dim, -1)  # a view: (..., H)
        if wm.dim() > 2:  # stacked experts: one expert at a time
            scales = self.scales
            for e in range(wm.shape[0]):
                part = self if self.norm != "column" else replace(self, scales=scales.reshape(wm.shape[:-1])[e])
                part.apply_(wm[e], -1)
            return w
        if wm.dim() < 2:
            self.rows_(wm, 0)
            return w
        rows = self.block_rows(wm.shape[-1])
        for i in range(0, wm.shape[0], rows):
            self.rows_(wm[i:i + rows], i)
        return w

    @staticmethod
    def block_rows(hidden: int) -> int:
        """How many rows (of `hidden` values each, residual axis last) `apply_` edits at a time."""
        return max(1, BLOCK_BYTES // (4 * hidden))

    def rows_(self, block: torch.Tensor, start: int) -> torch.Tensor:
        """In place: rows `start`, `start + 1`, ... of a writer whose residual axis is the last (a (tokens, H)
        embedding, a (in, H) view of a matrix), or a (H,) bias; one of `apply_`'s blocks. The streamed bake calls
        this on the blocks it reads from disk, with `apply_`'s block boundaries, so it writes `apply_`'s bits."""
        x = project(_aligned(block), self.basis.to(block.device), self.weight)
        if self.norm == "row":
            x = x * self.scales.to(block.device)
        elif self.norm == "column" and block.dim() == 2:  # a bias has no input features to scale
            x = x * self.scales.to(block.device).reshape(-1)[start:start + len(block)].unsqueeze(-1)
        block.copy_(x)
        return block


def writer_edits(ablation: Ablation, layout: Layout, matrix=None) -> list[tuple[list[Writer], WriterEdit]]:
    """Every component the bake edits: its writers, and the edit they all get.

    A writer behind a post-norm (Gemma) is edited against its basis seen through the norm's
    scale, re-orthonormalised. Norm preservation needs the component's matrix: `matrix(writer)`
    gives its weights (default: the parameter itself; the streamed bake reads them from disk).
    """
    ablation.check(layout)
    out = []
    for _, writers, basis, weight, scale in _groups(ablation, layout):
        u = basis.float()
        if scale is not None:
            u = torch.linalg.qr((u * scale.to(u.device).float()).T).Q.T  # (k, H), orthonormal
        scales = None
        if ablation.norm != "none":
            m = _matrix(writers)
            scales = _norm_scales(m if matrix is None else replace(m, param=matrix(m)), u, weight, ablation.norm)
        out.append((writers, WriterEdit(u, weight, ablation.norm, scales)))
    return out


@torch.no_grad()
def apply_ablation_(model: nn.Module, ablation: Ablation, layout: Layout) -> list[str]:
    """In place: bake `ablation` into the weights (and biases) of every writer it touches. Returns the names edited.

    Computed in float32 and cast at the write (`WriterEdit`). An edited embedding first gets its
    own copy for a tied output head (`untie_lm_head_`).
    """
    ablation.check(layout)
    if ablation.embed:
        untie_lm_head_(model, layout)
    edited = []
    for writers, edit in writer_edits(ablation, layout):
        for writer in writers:
            edit.apply_(writer.param.data, writer.out_dim)
            edited.append(writer.name)
    return edited


def edited_names(ablation: Ablation, layout: Layout) -> list[str]:
    """The names `apply_ablation_` returns, in its order, without editing anything."""
    return [w.name for _, writers, *_ in _groups(ablation, layout) for w in writers]


def tied_head(layout: Layout) -> bool:
    """Whether the output head shares its matrix with the (first) embedding: the same parameter, or the same memory.

    A model built on the meta device (the streamed bake's skeleton) has no memory to compare, so
    there only the parameter itself counts.
    """
    head = layout.lm_head
    if head is None or not layout.embeddings:
        return False
    emb = layout.embeddings[0].param
    return head.weight is emb or (emb.device.type != "meta" and head.weight.data_ptr() == emb.data_ptr())


def untie_lm_head_(model: nn.Module, layout: Layout) -> bool:
    """In place: give the output head its own copy of a tied embedding matrix.

    Editing the embedding must not edit the head: the head reads the stream,
    it does not write it.
    """
    if not tied_head(layout):
        return False
    emb = layout.embeddings[0].param
    layout.lm_head.weight = nn.Parameter(emb.detach().clone(), requires_grad=False)
    for config in {id(model.config): model.config, id(text_config(model)): text_config(model)}.values():
        config.tie_word_embeddings = False
    return True
