"""Language-model text: each split read as one text, tokenized as one stream, cut into windows of tokens.

A split comes from ``demo-text`` (shipped with the package), a local folder (``train`` / ``test`` as ``.txt``, or parquet/JSONL with a
``text`` column whose rows are joined with a blank line), a single ``.txt`` file (its first 90%
of lines train, the rest test) or a hub alias (``WikiText-2``, a streamed sample of ``C4``; a copy
under ``$RBA_DATA_DIR/<alias folder>`` is used first). The stream is tokenized without special
tokens and cut into consecutive windows of ``seq_len`` tokens, the trailing partial window
dropped; a window is one sample (:class:`rba_core.data.Source` item: an int64 id array).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from rba_core.errors import RBAError, above_maximum
from rba_core.data.source import Source
from rba_core.registry import DEFAULT_SEQ_LEN, LM_TEXTS, LMTextInfo, lm_text_info, local_dataset_dir, local_text_advice

TRAIN_SHARE = 0.9  # a single text file: this share of its lines is the train split

def is_lm_text(name) -> bool:
    """Whether ``name`` is a language-model text source: a hub text alias, a ``.txt`` file or a
    folder holding ``train.txt`` / ``test.txt``."""
    if not isinstance(name, str):
        return False
    path = Path(name).expanduser()
    return bool(lm_text_info(name)) or (path.is_file() and path.suffix == ".txt") or \
        (path.is_dir() and any((path / f"{split}.txt").is_file() for split in ("train", "test")))


def _rows_text(path: Path) -> str:
    """A parquet or JSONL file's ``text`` column, rows joined with a blank line."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise RBAError(f"'{path}' has no 'text' column (it has {', '.join(table.column_names)}); name the text column 'text'.")
        rows = table.column("text").to_pylist()
    else:
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if "text" not in row:
                    raise RBAError(f"Line {number} of '{path}' has no 'text' field; every JSONL row needs one.")
                rows.append(row["text"])
    return "\n\n".join(str(r) for r in rows if r)


def _folder_text(folder: Path, split: str) -> str:
    for suffix in (".txt", ".parquet", ".jsonl"):
        path = folder / f"{split}{suffix}"
        if path.is_file():
            return path.read_text(encoding="utf-8") if suffix == ".txt" else _rows_text(path)
    raise RBAError(f"'{folder}' has no {split} text; provide {split}.txt (or {split}.parquet / {split}.jsonl "
                   "with a 'text' column).")


def _hub_text(info: LMTextInfo, split: str) -> str:
    try:
        import datasets

        hub_split = info.hub_split(split)
        if info.documents:  # far too large to download: a streamed sample of its first documents
            stream = datasets.load_dataset(info.hub_id, info.hub_config, split=hub_split, streaming=True)
            return "\n\n".join(row["text"] for _, row in zip(range(info.documents), stream))
        return "".join(datasets.load_dataset(info.hub_id, info.hub_config, split=hub_split)["text"])
    except Exception as exc:  # offline, missing repo: the same advice
        raise RBAError(f"'{info.alias}' ({info.hub_id}) cannot be loaded from the hub ({exc.__class__.__name__}); "
                       f"{local_text_advice(info)}") from None


def split_text(name: str, split: str) -> str:
    """The whole text of one split of a language-model source."""
    info = lm_text_info(name)
    if info:
        local = local_dataset_dir(info)
        return _folder_text(local, split) if local else _hub_text(info, split)
    path = Path(name).expanduser()
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        cut = int(len(lines) * TRAIN_SHARE)
        return "".join(lines[:cut] if split == "train" else lines[cut:])
    if path.is_dir():
        return _folder_text(path, split)
    raise RBAError(f"'{name}' is neither a text file, a folder with train/test texts nor one of "
                   f"{', '.join(LM_TEXTS)}.")


def token_windows(tokenizer, text: str, seq_len: int, what: str = "the text") -> np.ndarray:
    """(W, seq_len) int64: ``text`` tokenized as one stream without special tokens, cut into
    consecutive windows, the trailing partial window dropped."""
    if seq_len < 2:
        raise RBAError(f"The window length must be at least 2 tokens, got {seq_len}.")
    ids = np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], np.int64)
    count = len(ids) // seq_len
    if count == 0:
        raise RBAError(f"{what} has {len(ids)} tokens, fewer than one window of {seq_len}; add text or lower --seq-len.")
    return ids[: count * seq_len].reshape(count, seq_len)


@dataclass(frozen=True)
class LMText:
    """A language-model text source as windows of one model's tokens: what ``open_dataset`` opens
    for a causal LM. ``tokenizer_source``: the folder or hub id whose tokenizer cuts the text."""

    dataset: str
    tokenizer_source: str
    seq_len: int = DEFAULT_SEQ_LEN
    max_positions: int | None = None

    @property
    def name(self) -> str:
        return self.dataset

    def open_split(self, split: str):
        if self.max_positions and self.seq_len > self.max_positions:
            raise above_maximum("--seq-len", self.seq_len, self.max_positions)
        windows = _windows(self.dataset, self.tokenizer_source, self.seq_len, split, _stamp(self.dataset))
        fingerprint = {"seq_len": self.seq_len, "tokens": hashlib.sha256(windows.tobytes()).hexdigest()}
        load = lambda idx: [windows[i] for i in idx]  # noqa: E731
        return Source(self.dataset, split, np.full(len(windows), -1, np.int64), [], fingerprint, load, "text")


def _stamp(name: str) -> tuple:
    """Size and modification time of a local text's files: an edited file is read again."""
    path = Path(name).expanduser()
    files = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


@lru_cache(maxsize=8)
def _windows(dataset: str, tokenizer_source: str, seq_len: int, split: str, stamp: tuple) -> np.ndarray:
    """The windows of one split, tokenized once per process and file version (a run opens each
    split several times)."""
    from rba_core.models.decoder import DecoderLM

    tokenizer = DecoderLM.load_processor(tokenizer_source)
    windows = token_windows(tokenizer, split_text(dataset, split), seq_len, f"The {split} split of '{dataset}'")
    windows.flags.writeable = False
    return windows
