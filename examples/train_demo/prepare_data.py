"""Tokenize the Shakespeare corpus with GPT-2 and split it into train / held-out token files.

    python examples/train_demo/prepare_data.py --corpus ../shared/corpus/shakespeare.txt \
        --out examples/train_demo/data

Writes ``train.npy`` and ``heldout.npy`` (uint16 GPT-2 ids; works are separated by
``<|endoftext|>``) and ``meta.json``. The held-out split is every work whose index is a multiple of
``--heldout-every`` (whole plays, so no passage leaks between the splits).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import numpy as np


def split_works(text: str) -> list[str]:
    # works are separated by blank lines and start with an all-caps title followed by "by William Shakespeare"
    starts = [m.start() for m in re.finditer(r"(?m)^[^\n]+\n\nby William Shakespeare", text)]
    if not starts:
        return [text]
    starts.append(len(text))
    return [text[a:b].strip() for a, b in zip(starts[:-1], starts[1:], strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="../shared/corpus/shakespeare.txt")
    ap.add_argument("--out", default="examples/train_demo/data")
    ap.add_argument("--heldout-every", type=int, default=10, help="hold out works 0, N, 2N, ...")
    a = ap.parse_args()

    from fsdfm_mlx.convert.to_mlx import default_tokenizer_dir

    from fsdfm_mlx.load import load_tokenizer

    tok = load_tokenizer(default_tokenizer_dir())
    text = Path(a.corpus).read_text()
    works = split_works(text)
    eot = tok.eos_token_id
    train, held, held_titles = [], [], []
    for i, w in enumerate(works):
        ids = tok.encode(w) + [eot]
        if i % a.heldout_every == 0:
            held.extend(ids)
            held_titles.append(w.splitlines()[0])
        else:
            train.extend(ids)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train.npy", np.array(train, dtype=np.uint16))
    np.save(out / "heldout.npy", np.array(held, dtype=np.uint16))
    meta = {
        "corpus": str(a.corpus),
        "corpus_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "works": len(works),
        "heldout_works": held_titles,
        "train_tokens": len(train),
        "heldout_tokens": len(held),
        "tokenizer": "gpt2 (fsdfm_mlx/assets/gpt2)",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps({k: v for k, v in meta.items() if k != "heldout_works"}, indent=2))


if __name__ == "__main__":
    main()
