"""Training data for `swiglu-hf finetune`: read text, tokenize, pack into windows, hold out eval.

    tokens, about = load_tokens(path, tokenizer, vocab_size, text_field="text", max_tokens=None)
    train, held_out = split_windows(tokens, seq_len, eval_fraction)
    batches = make_batches(train, ...)

Formats (`--data`): `.txt` (one document), `.jsonl` (one JSON object per line, the text under
`--text-field`), `.parquet` (needs pyarrow) and a directory written by `datasets`'
`save_to_disk` (needs datasets; a DatasetDict uses its "train" split). Without `--data` the
shipped corpus (swiglu_hf/tools/data/corpus.txt, 16 KB of original prose) is used.

Documents are tokenized with the model's tokenizer (BOS first when the tokenizer adds one,
EOS after each document) or, for a model without one, as raw UTF-8 bytes (ids 0-255). Reading stops once
`max_tokens` are in hand, so a large file costs only what the run trains on.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ...errors import InvalidInputError, SwigluError

DATA_DIR = Path(__file__).parents[1] / "data"  # swiglu_hf/tools/data
CORPUS = DATA_DIR / "corpus.txt"
FORMATS = ".txt, .jsonl, .parquet, or a directory saved with datasets' save_to_disk"
_TXT_PIECE = 1 << 20  # characters per tokenizer call for .txt files (split at a line end)
BYTE_VOCAB = 256  # without a tokenizer the text trains as its UTF-8 bytes: ids 0-255


class MissingDependencyError(SwigluError, ImportError):
    """An optional package needed for this input is not installed; the message says what to pip install."""


def _require(module: str, package: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"reading {what} needs the `{package}` package: pip install {package}")


def _txt(path: Path) -> Iterator[tuple[str, bool]]:
    """The file as one document, in pieces that end at a line end: (text, is_document_end)."""
    with path.open(encoding="utf-8") as f:
        piece = ""
        for line in f:
            piece += line
            if len(piece) >= _TXT_PIECE:
                yield piece, False
                piece = ""
        yield piece, True


def _jsonl(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidInputError(f"{path}:{number} is not valid JSON ({err.msg}); each line must be one object") from None
            if not isinstance(record, dict) or field not in record:
                keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
                raise InvalidInputError(
                    f"{path}:{number} has no {field!r} field (it has {keys}); name the text field with --text-field"
                )
            if not isinstance(record[field], str):
                raise InvalidInputError(f"{path}:{number}: {field!r} is {type(record[field]).__name__}, not a string")
            yield record[field], True


def _parquet(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    if field not in file.schema_arrow.names:
        raise InvalidInputError(
            f"{path} has no column {field!r} (columns: {', '.join(file.schema_arrow.names)}); use --text-field"
        )
    for batch in file.iter_batches(columns=[field], batch_size=1000):
        for text in batch.column(0).to_pylist():
            if text:
                yield text, True


def _saved_dataset(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if field not in ds.column_names:
        raise InvalidInputError(f"{path} has no column {field!r} (columns: {', '.join(ds.column_names)}); use --text-field")
    for batch in ds.iter(batch_size=1000):
        for text in batch[field]:
            if text:
                yield text, True


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """(text, is_document_end) pieces of the data at `path`; typed errors for what cannot be read."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InvalidInputError(f"--data {path}: no such file or directory (formats: {FORMATS})")
    if path.is_dir():
        if any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            _require("datasets", "datasets", "a saved datasets directory")
            return _saved_dataset(path, text_field)
        raise InvalidInputError(f"--data {path} is a directory but not one saved with datasets' save_to_disk ({FORMATS})")
    readers = {".txt": lambda: _txt(path), ".jsonl": lambda: _jsonl(path, text_field),
               ".parquet": lambda: _parquet(path, text_field)}
    if path.suffix not in readers:
        raise InvalidInputError(f"--data {path}: unsupported file type {path.suffix or '(none)'!r}; use {FORMATS}")
    if path.suffix == ".parquet":
        _require("pyarrow", "pyarrow", ".parquet files")
    return readers[path.suffix]()


def _bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text by default (Llama-3 does, SmolLM2 not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def _encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        return list(text.encode("utf-8"))
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def load_tokens(path, tokenizer, vocab_size: int, *, eos_token_id: int | None, text_field: str = "text",
                max_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Token ids of the data (the shipped corpus when `path` is None) and a description of it."""
    if isinstance(eos_token_id, (list, tuple)):  # some configs list several EOS ids: end documents with the first
        eos_token_id = eos_token_id[0] if eos_token_id else None
    if tokenizer is None and vocab_size < BYTE_VOCAB:
        raise InvalidInputError(f"byte-level tokens need a vocabulary of >= {BYTE_VOCAB} ids; the model has {vocab_size}")
    if path is None:  # the shipped corpus: one document, no EOS (the historical default run)
        pieces, source, eos = iter([(CORPUS.read_text(encoding="utf-8"), False)]), "shipped corpus (corpus.txt, 16 KB)", None
    else:
        pieces, source, eos = read_documents(path, text_field), str(path), eos_token_id
    bos = _bos(tokenizer) if path is not None else None
    ids, documents, starting = [], 0, True
    for text, end in pieces:
        ids += ([bos] if starting and bos is not None else []) + _encode(tokenizer, text)
        if end and eos is not None:
            ids.append(eos)
        documents, starting = documents + end, end
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if not ids:
        raise InvalidInputError(f"--data {source} holds no text")
    tokens = torch.tensor(ids, dtype=torch.long)
    if int(tokens.max()) >= vocab_size:
        raise InvalidInputError(
            f"token id {int(tokens.max())} from the tokenizer is outside the model's vocabulary ({vocab_size}); "
            "the tokenizer does not belong to this model"
        )
    tokenizer_name = "byte-level (UTF-8 bytes)" if tokenizer is None else type(tokenizer).__name__
    return tokens, {"source": source, "documents": documents, "tokens_read": len(ids), "tokenizer": tokenizer_name}


def split_windows(tokens: torch.Tensor, seq_len: int, eval_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the tokens into non-overlapping (N, seq_len) windows; the last eval_fraction are held out."""
    n = tokens.numel() // seq_len
    held_out = 0 if eval_fraction <= 0 else max(1, round(n * eval_fraction))
    if n - held_out < 1:
        raise InvalidInputError(
            f"the data has {tokens.numel()} tokens: {n} window(s) of --seq-len {seq_len}, too few to train on and "
            f"hold out {held_out} for eval; lower --seq-len, give more text, or pass --eval-fraction 0"
        )
    windows = tokens[: n * seq_len].view(n, seq_len)
    return windows[: n - held_out], windows[n - held_out:]


def make_batches(windows: torch.Tensor, *, steps: int, grad_accum: int, batch_size: int, seed: int,
                 num_processes: int = 1, rank: int = 0) -> list[torch.Tensor]:
    """This process's steps * grad_accum micro-batches, each (batch_size, seq_len).

    Windows are taken in a seeded shuffled order (a fresh shuffle per pass over the data), the
    global batch of a micro-step is split across processes by rank, so every variant sees the
    same batches in the same order and ranks see disjoint rows. Micro-batches of B accumulated k
    times are the same windows as one batch of k*B.
    """
    micro_steps, width = steps * grad_accum, batch_size * num_processes
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(windows), generator=gen)
                       for _ in range(-(-micro_steps * width // len(windows)))])
    rows = order[: micro_steps * width].view(micro_steps, width)[:, rank * batch_size:(rank + 1) * batch_size]
    return list(windows[rows])


def eval_batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The held-out windows in order, in batches (every process evaluates all of them)."""
    return list(windows.split(batch_size)) if len(windows) else []
