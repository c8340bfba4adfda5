"""The forward pass one decoder block at a time, for models bigger than memory (directions --stream).

The in-memory path (`model.forward`) runs every batch through the whole model. Here the order is turned
around: every batch's hidden states go through block 0, then block 1, and so on. Each block's weights are
read from the safetensors shards (`export.streamed.Checkpoint`), used by every batch of the pass, and put back
on the meta device, so a stage loads each block once. The model is the checkpoint's skeleton
(`export.streamed.open_skeleton`: on the meta device, its 1-D tensors real), and everything is run by the
model's own modules:

- the token embedding is run on the rows the prompts use, read from its shard alone (a compact table);
- what a block receives (the causal and padding mask of each attention type, the rotary cos/sin, position
  ids, GPT-2's position embedding added to the stream) comes from the decoder's own forward, run once per
  batch with every block replaced by a recorder that keeps its arguments and passes the stream on;
- the final norm is the decoder's forward again, with the final stream put in at block 0; the head reads its
  rows in slices no bigger than a block, for the last position only.

Interventions are the in-memory hooks (`edit.project.ablated`, `added`) installed on the skeleton: they
sit on the modules the materialized weights fill, so each stream of a pass runs under its own hooks.

Memory (`Budget`): the largest block, twice while it is read (the copy and the shard's mapped pages), the
hidden states of every stream of a pass, one batch's block temporaries, and the head's slice and logits. A
pass whose streams do not fit is split into several passes (each loads every block once).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..errors import AbliterateError
from .arch import text_config
from .forward import Batch, id_batches

log = logging.getLogger(__name__)

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str, option: str = "--max-memory") -> int:
    """Bytes in `text` ("512MB", "8GB", "1.5GiB"); an error naming the value and the form otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise AbliterateError(f"{option} {text!r} is not a size; give a number and a unit, e.g. 512MB or 8GB "
                              f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def show_bytes(n: float) -> str:
    """`n` bytes in the largest unit, rounded up (a budget shown is never less than the one meant)."""
    for unit in ("GB", "MB", "KB"):
        if n >= _UNITS[unit]:
            digits = 1 if n < 10 * _UNITS[unit] else 0
            return f"{math.ceil(n / _UNITS[unit] * 10**digits) / 10**digits:.{digits}f}{unit}"
    return f"{math.ceil(n)}B"


Hooks = Callable[[nn.Module], AbstractContextManager]  # model -> the hooks of an intervention, as a context manager


@dataclass
class Stream:
    """One prompt list (token ids) run through the model under one intervention's hooks (None: none)."""

    ids: list[list[int]]
    hooks: Hooks | None = None

    def __call__(self, model: nn.Module) -> AbstractContextManager:
        return self.hooks(model) if self.hooks is not None else nullcontext()


@dataclass
class _Item:
    """One batch of one stream, as it goes through the blocks."""

    stream: int
    batch: Batch
    hidden: torch.Tensor | None = None  # (B, T, H), the stream entering the next block
    calls: list | None = None  # per block: (args after the hidden states, kwargs), as the decoder passes them


@dataclass
class Budget:
    """Bytes a pass holds, by part (see the module docstring)."""

    block: int  # the largest decoder block, in the load dtype
    fixed: int  # the other embeddings (GPT-2's positions) and the skeleton's 1-D tensors
    head: int  # one head slice, and the logits of one stream and of the baseline
    per_token: int  # hidden states kept between blocks: H * itemsize per token of every batch of the pass
    work_per_token: int  # a block's temporaries per token of the batch it runs (MLP, q/k/v, attention output)
    score_per_entry: int  # attention scores: per (token, key position) of the batch, times the heads

    def needed(self, tokens: int, batch_tokens: int, width: int) -> int:
        """A pass holding `tokens` tokens of hidden states, running batches of `batch_tokens` tokens, `width` wide."""
        work = batch_tokens * (self.work_per_token + self.score_per_entry * width)
        return 2 * self.block + self.fixed + self.head + self.per_token * tokens + work


class StreamedModel:
    """A checkpoint's model run one block at a time (`run`), within `max_memory` bytes if given."""

    def __init__(self, skel, max_memory: int | None = None, batch_size: int = 32, n_logits: int = 64,
                 option: str = "--max-memory", source: str | None = None):
        """`n_logits`: the most prompts of one stream whose logits are asked for (for the budget)."""
        self.skel, self.max_memory, self.batch_size, self.option = skel, max_memory, batch_size, option
        self.source = source or str(skel.ckpt.root)
        self.n_logits = n_logits
        model, layout = skel.model.eval(), skel.layout  # eval: GPT-2's dropout off, as load_model has it
        self.model, self.layout, self.tokenizer = model, layout, skel.tokenizer
        self.config = text_config(model)
        path = layout.spec.layers.rsplit(".", 1)[0]
        self.decoder = model.get_submodule(path)  # the module whose forward runs the blocks (its `layers`)
        self.blocks = [b.module for b in layout.blocks]
        self.block_names = [f"{layout.spec.layers}.{i}" for i in range(len(self.blocks))]
        self.token_embedding = model.get_input_embeddings()
        self._real_buffers()
        self._stored = [self._disk_names(i) for i in range(len(self.blocks))]  # before any weight is read
        self._token_name = self._disk_name(self._param_name(self.token_embedding.weight))
        head = layout.lm_head
        self._head_name = self._disk_name(self._param_name(head.weight))  # a tied head: the embedding's name
        self.vocab, self.hidden_size = head.weight.shape
        self.itemsize = torch.finfo(skel.dtype).bits // 8
        self.budget = self._budget()

    # -- what is where ------------------------------------------------------------------------------------------

    def _param_name(self, param: torch.Tensor) -> str:
        return next(n for n, p in self.model.named_parameters(remove_duplicate=False) if p is param)

    def _disk_name(self, name: str) -> str:
        from ..export.streamed import stored

        names = stored(self.model, name, self.model.get_parameter(name)).names
        if len(names) == 1 and names[0] in self.skel.ckpt.where:
            return names[0]
        raise AbliterateError(f"{name} is not in {self.skel.ckpt.root} under the name this transformers gives it "
                              f"({', '.join(names)}); leave out --stream")

    def _real_buffers(self) -> None:
        """In place: the skeleton's non-persistent buffers (rotary frequencies, Gemma's embedding scale) made
        real and computed as `from_pretrained` computes them (`_init_weights` of the modules that own them)."""
        owners = {}
        for name, buf in self.model.named_non_persistent_buffers():
            if buf.device.type == "meta":
                set_module_tensor_to_device(self.model, name, self.skel.device,
                                            value=torch.empty_like(buf, device=self.skel.device))
                owners[name.rsplit(".", 1)[0] if "." in name else ""] = True
        for path in owners:
            self.model._init_weights(self.model.get_submodule(path))
        bad = [n for n, b in self.model.named_buffers() if b.device.type == "meta" or
               (b.is_floating_point() and not torch.isfinite(b).all())]
        assert not bad, f"buffers not made real: {bad}"

    def _block_params(self, i: int) -> list[tuple[str, torch.Tensor]]:
        """Block i's parameters still on the meta device (its 2-D and larger weights), by full model name."""
        return [(f"{self.block_names[i]}.{n}", p) for n, p in self.blocks[i].named_parameters()
                if p.device.type == "meta"]

    def _disk_names(self, i: int) -> list:
        from ..export.streamed import stored

        try:
            return [stored(self.model, n, p) for n, p in self._block_params(i)]
        except AbliterateError as e:
            raise AbliterateError(f"the streamed forward cannot read block {i}: {e}") from e

    def block_bytes(self, i: int) -> int:
        return sum(p.numel() for _, p in self._block_params(i)) * self.itemsize

    def _budget(self) -> Budget:
        cfg = self.config
        block = max(self.block_bytes(i) for i in range(len(self.blocks)))
        others = [m for m in self.layout.embedding_modules if m is not self.token_embedding]
        fixed = sum(p.numel() for m in others for p in m.parameters()) * self.itemsize
        fixed += sum(p.numel() * p.element_size() for p in self.model.parameters() if p.device.type != "meta")
        rows = self._head_rows()
        head = rows * self.hidden_size * self.itemsize + 2 * self.n_logits * self.vocab * 4
        inter = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * self.hidden_size)
        moe = int(getattr(cfg, "num_experts_per_tok", 1) or 1)
        heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        work = (3 * moe * inter + 6 * self.hidden_size) * self.itemsize  # gate, up, their product; q, k, v, out
        return Budget(block, fixed, head, self.hidden_size * self.itemsize, work, 2 * heads * self.itemsize)

    def _head_rows(self) -> int:
        """Head rows per slice: a slice is no bigger than a block (so the head does not raise the peak)."""
        block = max(self.block_bytes(i) for i in range(len(self.blocks)))
        return max(1, min(self.vocab, block // (self.hidden_size * self.itemsize)))

    # -- memory ---------------------------------------------------------------------------------------------------

    def groups(self, items: list[_Item]) -> list[list[_Item]]:
        """The passes: consecutive items whose hidden states fit `max_memory` together (all in one without it)."""
        if self.max_memory is None:
            return [items]
        out, cur, tokens = [], [], 0
        for it in items:
            b, t = it.batch.input_ids.shape
            need = self.budget.needed(tokens + b * t, self.batch_size * t, t)
            if need > self.max_memory:
                if not cur:
                    smallest = self.budget.needed(b * t, self.batch_size * t, t)
                    raise AbliterateError(
                        f"{self.option} {show_bytes(self.max_memory)} is too small for one block of this model and "
                        f"one batch of prompts: the smallest budget that works is {show_bytes(smallest)} (largest "
                        f"block {show_bytes(self.budget.block)}, read twice over, plus one batch of {b} x {t} "
                        f"tokens): give {self.option} {show_bytes(smallest)} or more, or a smaller --batch-size")
                out.append(cur)
                cur, tokens = [], 0
            cur.append(it)
            tokens += b * t
        return out + [cur] if cur else out

    def check_budget(self, longest: int) -> None:
        """Before any block is read: one batch of `longest` tokens must fit (`groups` gives the error)."""
        fake = _Item(0, Batch([0] * self.batch_size, torch.zeros(self.batch_size, longest, dtype=torch.long),
                              torch.ones(self.batch_size, longest, dtype=torch.long)))
        self.groups([fake])

    # -- weights in and out --------------------------------------------------------------------------------------

    @contextmanager
    def _materialized(self, i: int):
        """Block i's weights read from the shards for the block; back on the meta device on exit."""
        from ..export.streamed import _cast

        params = self._block_params(i)
        wheres = self._stored[i]
        tensors = iter(self.skel.ckpt.read([name for w in wheres for name in w.names]))
        try:
            for (name, p), w in zip(params, wheres):
                pieces = [_cast(next(tensors), self.skel.dtype) for _ in w.names]
                value = torch.stack(pieces) if w.stacked else pieces[0]
                if tuple(value.shape) != tuple(p.shape):
                    raise AbliterateError(f"{name} is {tuple(value.shape)} in {self.skel.ckpt.root} but the model "
                                          f"expects {tuple(p.shape)}; re-download or re-save the model")
                set_module_tensor_to_device(self.model, name, self.skel.device, value=value)
                del pieces, value
            yield self.blocks[i]
        finally:
            for name, _ in params:
                set_module_tensor_to_device(self.model, name, "meta")

    @contextmanager
    def _token_rows(self, ids: torch.Tensor):
        """The token embedding holding only the rows `ids` uses (they index it, in order), for the block."""
        emb = self.token_embedding
        table = torch.empty(len(ids), self.hidden_size, dtype=self.skel.dtype)
        shard = self.skel.ckpt.where[self._token_name]
        with safe_open(str(self.skel.ckpt.root / shard), "pt") as f:
            sl = f.get_slice(self._token_name)
            for j, r in enumerate(ids.tolist()):
                table[j] = sl[r:r + 1][0].to(self.skel.dtype)
        meta_weight, padding_idx = emb.weight, emb.padding_idx
        try:
            emb._parameters["weight"] = nn.Parameter(table.to(self.skel.device), requires_grad=False)
            emb.padding_idx = None  # it indexes the whole table (and matters only to gradients)
            yield emb
        finally:
            emb._parameters["weight"], emb.padding_idx = meta_weight, padding_idx

    @contextmanager
    def _other_embeddings(self):
        """The embeddings besides the tokens' (GPT-2's positions) read whole, for the block: the decoder's
        forward runs them."""
        others = [(self._param_name(p), p) for m in self.layout.embedding_modules if m is not self.token_embedding
                  for p in m.parameters() if p.is_meta]
        try:
            for name, p in others:
                set_module_tensor_to_device(self.model, name, self.skel.device, value=self.skel.read(name, p))
            yield
        finally:
            for name, _ in others:
                set_module_tensor_to_device(self.model, name, "meta")

    # -- the decoder's own arguments ---------------------------------------------------------------------------------

    @contextmanager
    def _recorders(self, calls: list, start: list, inject: torch.Tensor | None = None):
        """Every block replaced by a recorder: block i appends its (args, kwargs) to `calls`, block 0 its input
        hidden states to `start` and, with `inject`, passes `inject` on instead."""
        def recorder(i):
            def forward(*args, **kwargs):
                if args:
                    h, rest = args[0], args[1:]
                else:
                    h, rest = kwargs.pop("hidden_states"), ()
                calls.append((rest, kwargs))
                if i == 0:
                    start.append(h)
                    if inject is not None:
                        return inject
                return h
            return forward
        try:
            for i, block in enumerate(self.blocks):
                block.forward = recorder(i)
            yield
        finally:
            for block in self.blocks:
                del block.forward

    def _decoder(self, batch: Batch, embeds: torch.Tensor, inject: torch.Tensor | None = None):
        """The decoder's forward on one batch, as `model.forward.forward` calls the model (positions count real
        tokens), with recorders for blocks: (the stream entering block 0, each block's arguments, the output)."""
        calls, start = [], []
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
        with self._recorders(calls, start, inject):
            out = self.decoder(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=position_ids,
                               use_cache=False)
        assert len(calls) == len(self.blocks), f"the decoder ran {len(calls)} of {len(self.blocks)} blocks"
        return start[0], calls, out.last_hidden_state

    @property
    def loaded(self):
        """The skeleton as a `Loaded` (its tokenizer, its source), for the steps that take one."""
        from .load import Loaded

        return Loaded(self.model, self.tokenizer, str(self.source), self.skel.ckpt.root)

    def logits(self, jobs: list[tuple[list[str], Hooks | None]], desc: str | None = None) -> Iterator[torch.Tensor]:
        """`find.selection`'s runner: each formatted prompt list's next-token logits under its hooks, all lists in
        one pass (or as many as --max-memory needs)."""
        streams = [Stream(self.tokenizer(list(texts), add_special_tokens=False).input_ids, hooks)
                   for texts, hooks in jobs]
        yield from self.run(streams, desc=desc or "streamed pass")

    # -- the pass -----------------------------------------------------------------------------------------------------

    def items(self, streams: list[Stream]) -> list[_Item]:
        pad = self.tokenizer.pad_token_id
        return [_Item(s, b) for s, stream in enumerate(streams)
                for b in id_batches(stream.ids, pad, self.batch_size, self.skel.device)]

    @torch.inference_mode()
    def run(self, streams: list[Stream], *, tap: Callable[[int, int, Batch, torch.Tensor], None] | None = None,
            logits: bool = True, desc: str = "streamed pass") -> Iterator[torch.Tensor]:
        """Every stream through every block; `tap(stream, layer, batch, hidden)` sees the stream entering each
        block (before the interventions' pre-hooks). With `logits`, yields each stream's next-token logits after
        its last token, (N, V) float32 on CPU in input order, stream by stream."""
        all_items = self.items(streams)
        self.check_budget(max(it.batch.input_ids.shape[1] for it in all_items))
        with self._other_embeddings():
            yield from self._run(streams, all_items, tap, logits, desc)

    def _run(self, streams, all_items, tap, logits, desc):
        groups = self.groups(all_items)
        if len(groups) > 1:
            log.warning("%s %s: %s in %d passes (each reads every block once)", self.option,
                        show_bytes(self.max_memory), desc, len(groups))
        pending: dict[int, list] = {}
        remaining = {s: sum(1 for it in all_items if it.stream == s) for s in range(len(streams))}
        for group in groups:
            self._start(group, streams)
            for layer in tqdm(range(len(self.blocks)), desc=desc, leave=False, unit="block"):
                with self._materialized(layer) as block:
                    for s in dict.fromkeys(it.stream for it in group):
                        with streams[s](self.model):
                            for it in group:
                                if it.stream != s:
                                    continue
                                if tap is not None:
                                    tap(s, layer, it.batch, it.hidden)
                                args, kwargs = it.calls[layer]
                                it.hidden = block(it.hidden, *args, **kwargs)
            for s in dict.fromkeys(it.stream for it in group):  # the head, stream by stream: one's logits at a time
                for it in (it for it in group if it.stream == s):
                    if logits:
                        last = self._head(it)
                        out = pending.setdefault(s, [None] * len(streams[s].ids))
                        for row, i in enumerate(it.batch.index):
                            out[i] = last[row]
                    it.hidden = it.calls = None
                    remaining[s] -= 1
                if logits and remaining[s] == 0:
                    yield torch.stack(pending.pop(s))

    def _start(self, group: list[_Item], streams: list[Stream]) -> None:
        """The stream entering block 0 for each item, under its stream's intervention, and what each block is
        passed."""
        ids = torch.cat([it.batch.input_ids.flatten() for it in group]).unique(sorted=True)
        with self._token_rows(ids.cpu()) as emb:
            for it in group:
                with streams[it.stream](self.model):
                    compact = torch.searchsorted(ids.to(it.batch.input_ids.device), it.batch.input_ids)
                    embeds = emb(compact)
                    it.hidden, it.calls, _ = self._decoder(it.batch, embeds)

    def _head(self, it: _Item) -> torch.Tensor:
        """Next-token logits of one item: the decoder's final norm on its last stream, then the head's rows in
        slices, (B, V) float32 on CPU."""
        _, _, normed = self._decoder(it.batch, it.hidden, inject=it.hidden)
        x = normed[:, -1]  # (B, H)
        head = self.layout.lm_head
        bias = head.bias if getattr(head, "bias", None) is not None and head.bias.device.type != "meta" else None
        rows = self._head_rows()
        out = torch.empty(x.shape[0], self.vocab, dtype=torch.float32)
        shard = self.skel.ckpt.where[self._head_name]
        for a in range(0, self.vocab, rows):
            with safe_open(str(self.skel.ckpt.root / shard), "pt") as f:  # reopened: its mapped pages go
                w = f.get_slice(self._head_name)[a:a + rows].to(self.skel.dtype).to(x.device)
            out[:, a:a + rows] = F.linear(x, w, None if bias is None else bias[a:a + rows]).float().cpu()
        cap = getattr(self.config, "final_logit_softcapping", None)  # Gemma 2's head, as its forward applies it
        if cap:
            out = torch.tanh(out / cap) * cap
        return out
