"""Write a small character-level corpus as token shards, as nanoGPT's data/*/prepare.py writes
train.bin: one row per document, its tokens in an integer list column.

    python examples/nanogpt_style/prepare.py /tmp/tk-nanogpt-data

The text is made of a few words in a seeded random order, so a small model learns it within a
few hundred iterations on CPU. ``meta.json`` holds the alphabet (nanoGPT's meta.pkl).
"""

from __future__ import annotations

import argparse
import json
import os
import random

import pyarrow as pa

from shards import write_shards

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "log",
    "fast",
    "slow",
    "and",
    "then",
]
ALPHABET = sorted(set(" .\n" + "".join(WORDS)))


def document(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 8)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        sentences.append(" ".join(words) + ".")
    return " ".join(sentences) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="directory or URL of the token shards")
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    index = {char: token for token, char in enumerate(ALPHABET)}
    documents = [[index[char] for char in document(rng)] for _ in range(args.documents)]
    table = pa.table({"tokens": pa.array(documents, type=pa.list_(pa.int16()))})
    write_shards(table, args.dest, bytes_per_shard=256 << 10, progress=False)
    if "://" not in args.dest:
        with open(os.path.join(args.dest, "meta.json"), "w") as file:
            json.dump({"alphabet": ALPHABET}, file)
    tokens = sum(map(len, documents))
    print(f"{tokens:,} tokens in {args.documents:,} documents -> {args.dest}")


if __name__ == "__main__":
    main()
