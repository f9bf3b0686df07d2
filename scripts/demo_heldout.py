"""Write the demo model's held-out text: the corpus files that lie wholly in its held-out tail.

`scripts/train_demo.py` holds out the last 2% of the token stream (`<s> file </s>` per file, corpus
order); the tail starts inside one file. This script rebuilds the same corpus (it checks the sha256
the model card records), tokenizes it with the demo tokenizer, and writes the files after the one the
split cuts through, joined by newlines, so `llama-export eval --text` scores text the model never
trained on:

    python scripts/demo_heldout.py --out heldout.txt
    llama-export eval --text heldout.txt                      # the demo model, eager fp32
"""

from __future__ import annotations

import argparse
import re
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from train_demo import TrainConfig, collect_corpus, corpus_sha256  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import sentencepiece as spm

    from llama_export.demo import DEMO_DIR

    tc = TrainConfig()
    corpus = collect_corpus(Path(sysconfig.get_paths()["stdlib"]), tc.max_corpus_bytes)
    card = (DEMO_DIR / "MODEL_CARD.md").read_text()
    want = re.search(r"sha256 of the \(path, text\) sequence: `([0-9a-f]{64})`", card)
    if want is None or corpus_sha256(corpus) != want.group(1):
        print("error: this Python's stdlib is not the demo model's corpus (sha256 differs from "
              "MODEL_CARD.md); its held-out text cannot be rebuilt here", file=sys.stderr)
        return 2
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_DIR / "tokenizer.model"))
    lengths = [len(ids) + 2 for ids in sp.encode([text for _, text in corpus])]  # + <s> and </s>
    total = sum(lengths)
    n_val = max(int(total * tc.val_fraction), 2 * tc.seq_len + 2)  # as train_demo.py splits
    start, first = total - n_val, 0
    while sum(lengths[: first]) < start:
        first += 1
    files = corpus[first:]
    args.out.write_text("\n".join(text for _, text in files))
    print(f"{len(files)} files ({files[0][0]} .. {files[-1][0]}), {sum(lengths[first:]):,} of the "
          f"{n_val:,} held-out tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
