"""The ``debian_section`` task's data: the JSONL files beside this file (written by ``build.py``), read
without the network or the datasets cache, whatever the working directory."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(**_kwargs):
    """lm-eval's ``custom_dataset``: the ``test`` and ``train`` splits as a DatasetDict."""
    import datasets

    def split(name: str):
        lines = (HERE / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        return datasets.Dataset.from_list([json.loads(line) for line in lines if line.strip()])

    return datasets.DatasetDict({"test": split("test"), "train": split("train")})
