#!/usr/bin/env python3
"""Held-out perplexity of the demo model on data neither training stage saw (docs/DEMO_MODEL.md).

Rebuilds both stages' document order and packing exactly as ``make_demo_data.py --pack`` did, recovers which
windows ``mixtral train`` held out (its seeded split), and keeps the fortunes that were only ever in held-out
windows of stage 1 and not in stage 2's data at all. Reports the perplexity of a model on those fortunes
(every token after <s>) and on freshly generated synthetic conversations (assistant tokens only).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from mixtral.bench.quant_quality import perplexity
from mixtral.checkpoint.loader import load_model
from mixtral.train.data import Encoder
from mixtral.train.synthetic import ConversationGenerator

sys.path.insert(0, str(Path(__file__).parent))
from make_demo_data import collect_fortunes


def window_of_docs(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Which windows each document lands in under data.pack's rule."""
    where: list[list[int]] = []
    window, used = 0, 0
    for n in lengths:
        if used and used + n > seq_len:
            window, used = window + 1, 0
        spans = []
        for start in range(0, n, seq_len):
            piece = min(seq_len, n - start)
            spans.append(window)
            used += piece
            if used == seq_len:
                window, used = window + 1, 0
        where.append(sorted(set(spans)))
    return where


def held_out_windows(n_windows: int, fraction: float, seed: int) -> set[int]:
    n_eval = max(1, round(n_windows * fraction))
    perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
    return set(perm[:n_eval].tolist())


def stage_records(fortunes: dict[str, list[str]], n_conv: int, seed: int, loc: float) -> list[dict]:
    texts = [{"text": t} for items in fortunes.values() for t in items]
    return texts + ConversationGenerator(seed, fortunes, loc).generate(n_conv)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help="model to evaluate (default: the bundled demo)")
    p.add_argument("--fortunes-dir", default="/usr/share/games/fortunes",
                   help="folder of fortune files to draw the held-out texts from (Debian's fortunes packages)")
    p.add_argument("--max-docs", type=int, default=400, help="held-out fortunes to score")
    p.add_argument("--dump-texts", type=Path, default=None, metavar="FILE",
                   help="also write the held-out fortunes to FILE, one JSON string a line (what `mixtral bench "
                        "quality --texts FILE` scores)")
    args = p.parse_args()
    root = Path(args.fortunes_dir)
    enc = Encoder("v3")
    # Stage 1: make_demo_data.py --conversations 40000 --seed 0 --pack (seq 1024); trained with seed 0.
    f1 = collect_fortunes(root)
    rec1 = stage_records(f1, 40000, 0, 0.0)
    order = list(range(len(rec1)))
    random.Random(0).shuffle(order)  # the shuffle make_demo_data applies to the encoded documents
    lengths = [len(enc.sp.encode(r["text"], bos=True, eos=True)) if "text" in r else len(enc.encode_chat(r)[0])
               for r in (rec1[i] for i in order)]
    where = window_of_docs(lengths, 1024)
    n_windows = max(w[-1] for w in where) + 1
    held = held_out_windows(n_windows, 0.02, 0)
    unseen1 = {rec1[i]["text"] for i, w in zip(order, where, strict=True) if "text" in rec1[i] and set(w) <= held}
    # Stage 2 saw its own (filtered, capped) fortunes, as texts and as chat answers.
    f2 = collect_fortunes(root, 8000, prose_only=True)
    seen2 = {t for items in f2.values() for t in items}
    candidates = sorted(unseen1 - seen2)
    rng = random.Random(0)
    pick = rng.sample(candidates, min(args.max_docs, len(candidates)))
    if args.dump_texts is not None:
        args.dump_texts.write_text("".join(json.dumps(t) + "\n" for t in pick))
    model = load_model(args.model, "cpu", torch.float32, progress=False)
    fort_ppl, fort_tokens = perplexity(model, [enc.encode_text(t) for t in pick])
    fresh = ConversationGenerator(12345, {"en": ["A new saying."]}, 0.7).generate(200)
    chat_docs = [enc.encode_chat(c) for c in fresh]
    chat_ppl, chat_tokens = perplexity(model, chat_docs)
    report = {
        "stage1_windows": n_windows,
        "held_out_fortunes": {"docs": len(pick), "of": len(candidates), "tokens": fort_tokens,
                              "perplexity": round(fort_ppl, 2)},
        "fresh_synthetic_chats": {"docs": len(chat_docs), "tokens": chat_tokens, "perplexity": round(chat_ppl, 3)},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
