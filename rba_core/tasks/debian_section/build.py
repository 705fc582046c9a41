"""Writes ``test.jsonl`` and ``train.jsonl`` of the ``debian_section`` lm-eval task from the shared
debian_descriptions set (parquet: ``text`` and a ClassLabel ``label`` over the six Debian sections).

    python rba_core/tasks/debian_section/build.py [DATASET_FOLDER]

DATASET_FOLDER defaults to ``../shared/datasets/debian_descriptions`` beside the checkout. The test rows are
a seeded, class-balanced, shuffled sample of its test split (:data:`PER_CLASS` per section, the rarest section has 49);
``train.jsonl`` holds a few rows per section of its train split, the pool lm-eval draws few-shot examples
from. The output is deterministic: rerunning it on the same data writes the same files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
DEFAULT = HERE.parents[2].parent / "shared" / "datasets" / "debian_descriptions"
SECTIONS = ("games", "science", "sound", "graphics", "mail", "database")  # the dataset's ClassLabel order
PER_CLASS = {"test": 40, "train": 5}
SEED = 0


def rows(folder: Path, split: str) -> list[dict]:
    """``PER_CLASS[split]`` rows per section of ``split`` in a seeded shuffled order (so that lm-eval's
    ``--limit N``, which takes the first N, sees every section)."""
    table = pq.read_table(folder / f"{split}.parquet")
    names = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["label"]["names"]
    if tuple(names) != SECTIONS:
        raise SystemExit(f"{folder}: expected the sections {SECTIONS}, found {names}")
    texts, labels = table.column("text").to_pylist(), table.column("label").to_numpy()
    rng = np.random.default_rng(SEED)
    chosen = [int(k) for label in range(len(SECTIONS))
              for k in rng.choice(np.flatnonzero(labels == label), PER_CLASS[split], replace=False)]
    chosen = [chosen[k] for k in rng.permutation(len(chosen))]
    return [{"text": texts[k], "label": int(labels[k]), "section": SECTIONS[labels[k]]} for k in chosen]


def main(argv: list[str]) -> None:
    folder = Path(argv[0]) if argv else DEFAULT
    for split in PER_CLASS:
        out = HERE / f"{split}.jsonl"
        out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows(folder, split)))
        print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
