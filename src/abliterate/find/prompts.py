"""Prompt sets: built-in, from files, or from Hugging Face datasets; and chat formatting."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import AbliterateError

SPLITS = ("train", "test")
# harmful/harmless: the refusal pair. english/french: the same 50 requests in each language,
# a concept pair for steering (the direction from English to French input).
BUILTIN = ("harmful", "harmless", "english", "french", "chinese")
_FIELDS = ("instruction", "prompt", "text", "goal", "question")
# Instructions longer than this many tokens are cut to it (with a warning). Every batch is padded to
# its longest prompt and attention grows with the square of the length, so one 10,000-character
# prompt made a batch of 4 take 222 s. Refusal prompts are one or two sentences (ours: at most 109
# characters, under 50 tokens; AdvBench's likewise), so 512 keeps any such instruction whole, with
# room for a paragraph of context, while bounding what one prompt can cost. Raise it for long-context
# prompt sets (a HarmBench contextual behaviour carries a document).
MAX_PROMPT_TOKENS = 512

log = logging.getLogger(__name__)

_JSON_KIND = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def _kind(value) -> str:
    """What a parsed JSON value is, with its article: 'a number', 'an object', 'null'."""
    return _JSON_KIND.get(type(value), f"a {type(value).__name__}")


def prompts_sha256(prompts) -> str:
    """The fingerprint of a list of prompts, as manifests and direction files record it."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


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
    """Our own prompt sets. Every fifth prompt of each category of `{kind}.txt` is held out as `test`, and so is
    every prompt of `{kind}_test.txt` where there is one (after the others: the first n of `test` stay what they
    were). `harmful_test.txt` doubles the held-out harmful prompts to 112, so the default evaluation separates a
    10-point change in refusals (docs/measure.md) without changing the prompts a direction is fitted on."""
    if kind not in BUILTIN:
        names = ", ".join(f"builtin:{k}" for k in BUILTIN)
        raise AbliterateError(f"no built-in prompt set {kind!r}; use one of {names}")
    if split not in (None, "all", *SPLITS):
        raise AbliterateError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} or all")
    data = resources.files("abliterate").joinpath("data")
    prompts, cats = [], []
    for name, held_out in ((f"{kind}.txt", False), (f"{kind}_test.txt", True)):
        if not data.joinpath(name).is_file():
            continue
        category, index = "", 0
        for line in data.joinpath(name).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("# "):
                category, index = line[2:].strip(), 0
                continue
            which = "test" if held_out or index % 5 == 4 else "train"
            index += 1
            if split in (None, "all") or which == split:
                prompts.append(line)
                cats.append(category)
    return PromptSet(f"builtin:{kind}" + (f":{split}" if split else ""), tuple(prompts), tuple(cats))


def _from_records(records: list, source: str, column: str | None, where: list[str] | None = None) -> list[str]:
    """Prompts from parsed JSON values; `where[i]` names record i in errors ('item 3', 'line 7'), 1-based."""
    out = []
    for i, rec in enumerate(records):
        at = where[i] if where else f"item {i + 1}"
        if isinstance(rec, str):
            out.append(_text(rec, source, at))
            continue
        if not isinstance(rec, dict):
            raise AbliterateError(f"{source}: {at} is {_kind(rec)}; expected a string or an object with a field "
                                  f"{column or ' or '.join(_FIELDS)!r}")
        keys = [column] if column else [k for k in _FIELDS if k in rec]
        if not keys or keys[0] not in rec:
            wanted = column or " or ".join(_FIELDS)
            raise AbliterateError(
                f"{source}: {at} has no field {wanted!r} (it has {sorted(rec)}); name the field with --column"
            )
        value = rec[keys[0]]
        if isinstance(value, (dict, list)) or value is None:
            raise AbliterateError(f"{source}: {at}'s field {keys[0]!r} is {_kind(value)}, not a prompt; give it a "
                                  f"string, or name another field with --column")
        out.append(_text(str(value), source, at))
    return out


def _text(value: str, source: str, at: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # only JSON can say this: an escape like \ud800 on its own
        raise AbliterateError(f"{source}: {at} holds {value[e.start]!r}, half of a UTF-16 surrogate pair, which "
                              f"is not text; fix that \\u escape") from e
    return value


def _read_text(path: Path, source: str) -> str:
    """The file as text: UTF-8 (a leading byte-order mark is dropped), no NUL bytes; else one clear error."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AbliterateError(f"could not read prompt file {source} ({e.strerror or e}); check its permissions") \
            from e
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # Notepad writes one
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        raise AbliterateError(
            f"prompt file {source} is not UTF-8 text (byte 0x{data[at]:02x} at byte offset {at} is not valid "
            f"UTF-8; latin-1 and UTF-16 files look like this); save it as UTF-8"
        ) from e
    nul = data.find(b"\0")
    if nul >= 0:
        raise AbliterateError(f"prompt file {source} holds a NUL byte at byte offset {nul}, so it is a binary "
                              f"file, not text; save the prompts as UTF-8 text")
    return text


def _lines(text: str) -> list[str]:
    """Lines as editors count them: \\n, \\r\\n or \\r ends one; \\u2028, \\x0c and the like do not (str.splitlines
    broke JSON strings that hold them, and numbered lines wrongly)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _jsonl(text: str, source: str, column: str | None) -> list[str]:
    records, where = [], []
    for number, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AbliterateError(f"{source}: line {number} is not valid JSON ({e.msg} at column {e.colno}); "
                                  f"fix that line: each line must be one JSON string or object") from e
        except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting deeper than Python's stack
            raise AbliterateError(f"{source}: line {number} cannot be read ({type(e).__name__}: "
                                  f"{str(e)[:100]}); fix that line") from e
        where.append(f"line {number}")
    return _from_records(records, source, column, where)


def _csv(text: str, source: str, column: str | None) -> list[str]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields may hold line breaks
    col = column or "prompt"
    try:
        header = list(reader.fieldnames or [])
        if col not in header:
            raise AbliterateError(f"{source}: no column {col!r} (columns: {header}); name it with --column")
        return [row[col] for row in reader if isinstance(row.get(col), str)]  # short rows lack it: skipped
    except csv.Error as e:  # a field over csv's size limit, a stray quote, ...
        raise AbliterateError(f"{source}: line {reader.line_num} is not valid CSV ({e}); fix that line") from e


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
            raise AbliterateError(f"prompt file {source} does not exist; check the path, or use a built-in set "
                                  f"such as builtin:harmful or builtin:harmless")
        suffix = path.suffix.lower()
        if suffix not in (".txt", ".json", ".jsonl", ".csv"):
            raise AbliterateError(f"{source}: unknown prompt file type {suffix!r}; use .txt, .json, .jsonl or .csv")
        text = _read_text(path, source)
        if suffix == ".txt":
            prompts = [line.strip() for line in _lines(text)]
        elif suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise AbliterateError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                                      f"fix it, or give a .txt file with one prompt per line") from e
            except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; absurdly deep nesting
                raise AbliterateError(f"{source} cannot be read as JSON ({type(e).__name__}: {str(e)[:100]})") \
                    from e
            if not isinstance(data, list):
                raise AbliterateError(f"{source}: expected a JSON list of prompts, got {_kind(data)}")
            prompts = _from_records(data, source, column)
        elif suffix == ".jsonl":
            prompts = _jsonl(text, source, column)
        else:
            prompts = _csv(text, source, column)
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise AbliterateError(f"prompt set {source} is empty; give at least one prompt")
    return PromptSet(source, tuple(prompts))


def _from_hub(dataset_id: str, column: str | None, split: str) -> list[str]:
    try:
        import datasets  # optional ([datasets]): only hf: prompt sets need it
    except ImportError as e:
        raise AbliterateError("hf: prompt sets need the `datasets` package: pip install datasets") from e
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # network, missing dataset, missing split: all one message
        raise AbliterateError(f"could not load dataset {dataset_id} split {split} ({str(e).strip()[:300]}); check "
                              f"the dataset id and split, and the network (or save the prompts to a file)") from e
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
        (Gemma without its BOS answers with markup soup). An instruction longer than
        MAX_PROMPT_TOKENS tokens is cut to that many, with a warning."""
        instruction, cut = cap_tokens(tokenizer, instruction)
        if cut:
            _warn_cut(1, 1)
        return self._render(tokenizer, instruction)

    def render_all(self, tokenizer, prompts) -> list[str]:
        """`render` for a prompt set: one warning for the set if any of its prompts were cut."""
        capped = [cap_tokens(tokenizer, p) for p in prompts]
        n_cut = sum(cut for _, cut in capped)
        if n_cut:
            key = prompts_sha256(p for p, cut in capped if cut)
            if key not in _WARNED:  # the same set rendered again (before and after an edit): said once
                _WARNED.add(key)
                _warn_cut(n_cut, len(capped))
        return [self._render(tokenizer, p) for p, _ in capped]

    def _render(self, tokenizer, instruction: str) -> str:
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

    def n_post_instruction(self, tokenizer) -> int:
        """Number of template tokens after the instruction (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`)."""
        marker = "Say hi."
        text = self.render(tokenizer, marker)
        suffix = text[text.rindex(marker) + len(marker):]
        return max(1, len(tokenizer(suffix, add_special_tokens=False).input_ids))


_WARNED: set[str] = set()


def _warn_cut(n_cut: int, n: int) -> None:
    which = "a prompt" if n == 1 else f"{n_cut} of {n} prompts"
    log.warning("%s longer than %d tokens %s cut to the first %d (abliterate.prompts.MAX_PROMPT_TOKENS: a longer "
                "prompt makes its whole batch slow); shorten %s to keep all of it", which, MAX_PROMPT_TOKENS,
                "was" if n_cut == 1 else "were", MAX_PROMPT_TOKENS, "it" if n_cut == 1 else "them")


def cap_tokens(tokenizer, text: str, limit: int | None = None) -> tuple[str, bool]:
    """`text` cut to its first `limit` tokens (default MAX_PROMPT_TOKENS), at a character boundary;
    and whether it was cut."""
    limit = MAX_PROMPT_TOKENS if limit is None else limit
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    ids = enc["input_ids"]
    if len(ids) <= limit:
        return text, False
    if not fast:  # no offsets: decoding the kept tokens may drop a split character, nothing worse
        return tokenizer.decode(ids[:limit]), True
    offsets = enc["offset_mapping"]
    keep = limit
    while keep > 1:  # a character split over tokens is kept whole, so re-encoding can exceed the limit by one
        cut = text[: offsets[keep - 1][1]]
        if len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= limit:
            return cut, True
        keep -= 1
    return text[: offsets[0][1]], True


def _bos(tokenizer) -> str:
    """The BOS token's text if this tokenizer puts one in front of what it encodes, else ''."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or tokenizer("a").input_ids[:1] != [bos]:
        return ""
    return tokenizer.bos_token
