"""Train a small byte-level BPE tokenizer.json on a text corpus.

For trying shoal's tokenized-data path end to end without downloading a tokenizer (the
README walk-through uses it: train a tokenizer, `shoal tokenize`, train on the shards).
A real run should use an established tokenizer; this one is as good as its few MB of text.

    python scripts/train_tokenizer.py --data SRC --vocab 4096 --out tok.json
"""

from __future__ import annotations

import argparse
import time

from shoal.train.data import load_corpus
from shoal.train.tokenizer import train_bpe_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        default=None,
        help="text file, folder or glob (.jsonl/.parquet: the text field); "
        "default: this Python's standard library sources",
    )
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size (>= 257)")
    parser.add_argument("--out", required=True, help="tokenizer.json to write")
    args = parser.parse_args()
    started = time.perf_counter()
    texts = (doc.decode("utf-8", errors="replace") for doc in load_corpus(args.data))
    tokenizer = train_bpe_tokenizer(texts, args.vocab, args.out)
    print(
        f"wrote {args.out}: {tokenizer.vocab_size} tokens, eos_id {tokenizer.eos_id}, "
        f"sha256 {tokenizer.sha256[:16]}… in {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
