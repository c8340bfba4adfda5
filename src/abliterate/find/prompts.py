"""Prompt sets: built-in, from files, or from Hugging Face datasets; and chat formatting."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import AbliterateError

SPLITS = ("train", "test")
# harmful/harmless: the refusal pair. english/french: the same 50 requests in each language,
# a concept pair for steering (the direction from English to French input).
BUILTIN = ("harmful", "harmless", "english", "french", "chinese")
_FIELDS = ("instruction", "prompt", "text", "goal", "question")


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]
    categories: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int | None) -> "PromptSet":
        if n is None or n >= len(self):
            return self
        return PromptSet(f"{self.name}[:{n}]", self.prompts[:n], self.categories[:n])


def _builtin(kind: str, split: str | None) -> PromptSet:
    """Our own prompt sets. Every fifth prompt of each category is held out as `test`."""
    if kind not in BUILTIN:
        names = ", ".join(f"builtin:{k}" for k in BUILTIN)
        raise AbliterateError(f"no built-in prompt set {kind!r}; use one of {names}")
    if split not in (None, "all", *SPLITS):
        raise AbliterateError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} or all")
    text = resources.files("abliterate").joinpath(f"data/{kind}.txt").read_text(encoding="utf-8")
    prompts, cats, category, index = [], [], "", 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("# "):
            category, index = line[2:].strip(), 0
            continue
        which = "test" if index % 5 == 4 else "train"
        index += 1
        if split in (None, "all") or which == split:
            prompts.append(line)
            cats.append(category)
    return PromptSet(f"builtin:{kind}" + (f":{split}" if split else ""), tuple(prompts), tuple(cats))


def _from_records(records: list, source: str, column: str | None) -> list[str]:
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            out.append(rec)
            continue
        if not isinstance(rec, dict):
            raise AbliterateError(f"{source}: item {i} is a {type(rec).__name__}; expected a string or an object")
        keys = [column] if column else [k for k in _FIELDS if k in rec]
        if not keys or keys[0] not in rec:
            wanted = column or " or ".join(_FIELDS)
            raise AbliterateError(
                f"{source}: item {i} has no field {wanted!r} (it has {sorted(rec)}); name the field with --column"
            )
        out.append(str(rec[keys[0]]))
    return out


def load_prompts(source: str, *, column: str | None = None, split: str | None = None) -> PromptSet:
    """Read prompts from `builtin:harmful|harmless[:split]`, a .txt/.json/.jsonl/.csv file, or `hf:dataset-id`."""
    if source.startswith("builtin:"):
        parts = source.split(":")
        return _builtin(parts[1], parts[2] if len(parts) > 2 else split)
    if source.startswith("hf:"):
        prompts = _from_hub(source[3:], column, split or "train")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise AbliterateError(f"prompt file {source} does not exist")
        suffix = path.suffix.lower()
        text = path.read_text(encoding="utf-8")
        try:
            if suffix == ".txt":
                prompts = [line.strip() for line in text.splitlines()]
            elif suffix == ".json":
                data = json.loads(text)
                if not isinstance(data, list):
                    raise AbliterateError(f"{source}: expected a JSON list of prompts, got a {type(data).__name__}")
                prompts = _from_records(data, source, column)
            elif suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
                prompts = _from_records(records, source, column)
            elif suffix == ".csv":
                rows = list(csv.DictReader(text.splitlines()))
                col = column or "prompt"
                header = list(rows[0]) if rows else []
                if col not in header:
                    raise AbliterateError(f"{source}: no column {col!r} (columns: {header}); name it with --column")
                prompts = [row[col] for row in rows]
            else:
                raise AbliterateError(f"{source}: unknown prompt file type {suffix!r}; use .txt, .json, .jsonl or .csv")
        except json.JSONDecodeError as e:
            raise AbliterateError(f"{source} is not valid JSON ({e})") from e
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise AbliterateError(f"prompt set {source} is empty; give at least one prompt")
    return PromptSet(source, tuple(prompts))


def _from_hub(dataset_id: str, column: str | None, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise AbliterateError("hf: prompt sets need the `datasets` package: pip install datasets") from e
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # network, missing dataset, missing split: all one message
        raise AbliterateError(f"could not load dataset {dataset_id} split {split}: {e}") from e
    col = column or next((c for c in _FIELDS if c in ds.column_names), None)
    if col not in ds.column_names:
        raise AbliterateError(f"dataset {dataset_id} has no column {col!r} ({ds.column_names}); use --column")
    return [str(x) for x in ds[col]]


@dataclass(frozen=True)
class ChatFormat:
    """How instructions become model input: the chat template (or plain text) and a system prompt."""

    system: str | None = None
    plain: bool = False

    def render(self, tokenizer, instruction: str) -> str:
        """The model's input as text, special tokens included: everything tokenizes it with
        add_special_tokens=False, so plain text gets the BOS token its tokenizer would add
        (Gemma without its BOS answers with markup soup)."""
        if self.plain:
            text = f"{self.system}\n\n{instruction}\n" if self.system else f"{instruction}\n"
            return _bos(tokenizer) + text
        if not getattr(tokenizer, "chat_template", None):
            raise AbliterateError(
                f"{getattr(tokenizer, 'name_or_path', 'this model')!s} has no chat template; "
                f"use --plain-prompts to feed raw text, or a chat model"
            )
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": instruction})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render_all(self, tokenizer, prompts) -> list[str]:
        return [self.render(tokenizer, p) for p in prompts]

    def n_post_instruction(self, tokenizer) -> int:
        """Number of template tokens after the instruction (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`)."""
        marker = "Say hi."
        text = self.render(tokenizer, marker)
        suffix = text[text.rindex(marker) + len(marker):]
        return max(1, len(tokenizer(suffix, add_special_tokens=False).input_ids))


def _bos(tokenizer) -> str:
    """The BOS token's text if this tokenizer puts one in front of what it encodes, else ''."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or tokenizer("a").input_ids[:1] != [bos]:
        return ""
    return tokenizer.bos_token
