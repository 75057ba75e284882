#!/usr/bin/env python3
"""Build the bundled demo model's training data: Debian fortunes + synthetic tool-use/greeting chats.

Reads fortune files (Debian packages ``fortunes``, ``fortunes-min``, ``fortunes-de``, ``fortunes-es``,
``fortunes-it``; by default from /usr/share/games/fortunes, or --fortunes-dir where the .deb files were
unpacked with ``dpkg -x``), writes ``OUT/fortunes.jsonl`` ({"text": ...} per fortune) and ``OUT/chat.jsonl``
({"messages", "tools"} per conversation), and with --pack also the encoded, packed dataset that
``mixtral train`` reads on a machine without mistral-common. See docs/DEMO_MODEL.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from mixtral.train.synthetic import ConversationGenerator

# Files left out: pictures made of characters, and collections with crude or offensive jokes.
EXCLUDE = {"ascii-art", "asciiart", "banner", "ethnic", "men-women", "drugs", "sex", "off", "medicine"}
LANG_DIRS = {"de": "de", "es": "es", "it": "it"}


# Chat logs (IRC quotes: "<nick> ...") and tab-indented layouts read as noise to a small model.
NOT_PROSE = re.compile(r"^\s*(<[^>\s]{1,20}>|\*\s|\|)|\t\t.*\t", re.MULTILINE)


def is_prose(text: str) -> bool:
    """A fortune that reads as sentences: no chat-log lines, few lines, mostly letters."""
    return not NOT_PROSE.search(text) and text.count("\n") <= 6


def read_fortune_file(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # older fortune files are ISO-8859-1
    out = []
    for item in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        item = item.strip("\n")
        lines = [ln.rstrip() for ln in item.splitlines()]
        body = "\n".join(lines).strip()
        # Keep prose: short enough to be a saying, and not mostly punctuation (ASCII art).
        if 10 <= len(body) <= 600 and sum(ch.isalpha() for ch in body) > 0.6 * len(body.replace(" ", "")):
            out.append(body)
    return out


def collect_fortunes(root: Path, max_per_lang: int | None = None, prose_only: bool = False
                     ) -> dict[str, list[str]]:
    """Fortunes by language: files under root/{de,es,it} are that language, the rest English."""
    by_lang: dict[str, list[str]] = {"en": [], "de": [], "es": [], "it": []}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix in (".dat", ".u8") or path.is_symlink():
            continue
        rel = path.relative_to(root).parts
        if EXCLUDE & {p.removesuffix(".fortunes") for p in rel}:
            continue
        lang = LANG_DIRS.get(rel[0], "en") if len(rel) > 1 else "en"
        if len(rel) > 1 and rel[0] not in LANG_DIRS:
            continue  # other language folders (none expected)
        by_lang[lang] += [f for f in read_fortune_file(path) if not prose_only or is_prose(f)]
    if max_per_lang:
        rng = random.Random(0)
        for lang, items in by_lang.items():
            if len(items) > max_per_lang:
                by_lang[lang] = rng.sample(items, max_per_lang)
    return by_lang


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fortunes-dir", default="/usr/share/games/fortunes", help="root of the fortune files")
    p.add_argument("--out", default="data/demo", help="output folder for the JSONL files")
    p.add_argument("--conversations", type=int, default=30000, help="synthetic conversations to generate")
    p.add_argument("--max-fortunes-per-lang", type=int, default=None, help="cap on fortunes per language")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator")
    p.add_argument("--prose-only", action="store_true", help="drop chat-log and heavily formatted fortunes")
    p.add_argument("--result-location-prob", type=float, default=0.0,
                   help="share of weather tool results that include the location")
    p.add_argument("--pack", metavar="FILE", help="also encode (v3) and pack into this .safetensors")
    p.add_argument("--seq-len", type=int, default=512, help="window length when packing")
    args = p.parse_args()

    fortunes = collect_fortunes(Path(args.fortunes_dir), args.max_fortunes_per_lang, args.prose_only)
    if not any(fortunes.values()):
        raise SystemExit(f"no fortunes under {args.fortunes_dir}: install or unpack the Debian packages")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "fortunes.jsonl").open("w", encoding="utf-8") as fh:
        for items in fortunes.values():
            for text in items:
                fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    chats = ConversationGenerator(args.seed, fortunes, args.result_location_prob).generate(args.conversations)
    with (out / "chat.jsonl").open("w", encoding="utf-8") as fh:
        for conv in chats:
            fh.write(json.dumps(conv, ensure_ascii=False) + "\n")
    print(json.dumps({"fortunes": {k: len(v) for k, v in fortunes.items()}, "conversations": len(chats)}))
    if args.pack:
        from mixtral.train.data import Encoder, pack, read_documents, save_packed

        docs = read_documents([out / "fortunes.jsonl", out / "chat.jsonl"], Encoder("v3"))
        random.Random(args.seed).shuffle(docs)  # mix text and chats within windows
        ds = pack(docs, args.seq_len)
        save_packed(ds, args.pack)
        print(json.dumps(ds.stats()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
