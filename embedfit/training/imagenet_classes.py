"""Map a data set's class names onto ImageNet-1k classes, for scoring a pretrained model "as-is".

A pretrained ImageNet model can classify a user's images without training when each user class names
ImageNet classes. People name folders the way they speak: "ants" (ImageNet "ant, emmet, pismire"),
"Golden_Retriever", "pismire", "dogs" (118 ImageNet breeds), "cats" (tabby ... cheetah). `map_classes` reads
them the way a person would:

1. Case, accents, apostrophes and separators (``_``, ``-``, spaces, none: "GoldenRetriever") do not matter.
2. A plural is read as its singular ("butterflies", "boxes", "geese", "mice", "wolves"): a few rules and
   exceptions make candidates, and the first one that names something wins.
3. A name is looked up among, in order: the 1000 classes (every WordNet synonym, the full class name
   "ant, emmet, pismire", the wnid "n02219486"); the WordNet synsets above them (a group: "dog" is the
   118 classes below WordNet's dog, every sense of the word counts, so "cat" covers the house cats and the big
   cats); and the synsets below them (a narrower name: a "fire ant" is an ImageNet "ant"). The first kind that
   matches wins: "tabby" is the class, even though it is also a word higher up; a note says when a name
   could also have meant a group ("plane": the carpenter's tool, not the aircraft).
4. When one user class names a class and another a group containing it ("tabby" and "cats"), the class goes
   to the first and the group keeps the rest. Any other sharing (two groups that overlap, two names of one
   class) is a conflict, and a conflict or a name found nowhere leaves that class unmapped.
5. Only when none of that finds a name: another WordNet sense of a class's word, with its own synonyms
   ("rooster": WordNet's "cock, rooster" shares "cock" with the class "cock"; only a sense near the class in
   the hierarchy, so "grass" does not read as the drug "pot"); the plural of a name that is
   a class only in the plural ("binocular": "binoculars"); the same head noun, when one class alone ends in
   it ("stop sign": the class "street sign"); a close spelling ("dalmation": "dalmatian"). Each such reading
   gets a note.

The as-is arm of `compare` scores the classes that map when some do not (`ClassMapping.subset`).

`load_imagenet_map_csv` reads an explicit mapping instead (``class,imagenet_class`` rows), and
`restricted_predict` / `top1_mapped` turn a pretrained model's (N, 1000) ImageNet probabilities into
predictions over the user's classes.

The ImageNet-1k class order is the standard one (timm's and torchvision's ImageNet models), and the
hierarchy comes from WordNet 3.0, shipped as ``embedfit/data/imagenet_hierarchy.json.gz`` (made by
``data/make_imagenet_hierarchy.py``; WordNet 3.0 Copyright 2006 Princeton University, under the permissive
WordNet licence, whose notice the file carries in its ``licence`` field).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import gzip
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np

from embedfit.errors import InputError, UsageError

NUM_CLASSES = 1000
_DATA = "data/imagenet_hierarchy.json.gz"  # inside the embedfit package

# How a name matched, best first: an ImageNet class, a group of classes (a synset above them), or a narrower
# name (a synset below one class).
CLASS, GROUP, NARROWER = "class", "group", "narrower"
# Readings tried only when those find nothing: another sense of a class's word, the same head noun, a spelling.
SYNONYM, HEAD, SPELLING = "synonym", "head noun", "spelling"
_KINDS = (CLASS, GROUP, NARROWER, SYNONYM)
_SPELLING_CUTOFF = 0.88  # difflib ratio: "dalmation" -> "dalmatian" (0.89), not "crane" -> "crate"

_WNID = re.compile(r"n\d{8}")
_DROPPED = re.compile(r"['’.]")  # "potter's wheel" = "potters wheel", "St. Bernard" = "St Bernard"
_SEPARATORS = re.compile(r"[\W_]+")

# Irregular plurals (plural -> singular) that the suffix rules below cannot undo.
_IRREGULAR = {
    "geese": "goose", "mice": "mouse", "lice": "louse", "teeth": "tooth", "feet": "foot", "oxen": "ox",
    "children": "child", "people": "person", "men": "man", "women": "woman", "dice": "die", "dominoes": "domino",
    "octopodes": "octopus", "corpora": "corpus", "genera": "genus", "phenomena": "phenomenon",
    "criteria": "criterion", "bacteria": "bacterium", "indices": "index", "matrices": "matrix",
    "appendices": "appendix", "vertices": "vertex", "apices": "apex", "quizzes": "quiz", "buses": "bus",
    "busses": "bus", "gases": "gas", "pennies": "penny", "dwarves": "dwarf", "hooves": "hoof", "staves": "staff",
}

# Words for the young that WordNet files under "young mammal", not under the animal.
_ALIASES = {"puppy": "dog", "kitten": "domestic cat"}


# ---------------------------------------------------------------------------------------------------------
# The ImageNet-1k hierarchy


@dataclasses.dataclass(frozen=True, eq=False)
class ImageNetHierarchy:
    """ImageNet-1k's classes in the WordNet noun hierarchy, indexed for name look-ups.

    Use `load_imagenet()` for the shipped data; build one directly only for tests or other data.

    Attributes:
        wnids: The 1000 class wnids in class-index order.
        lemmas: Every synset's WordNet lemmas (``"Golden_retriever"``), for the classes, the synsets above them
            and those below them.
        parents: Every synset's hypernyms among those synsets.
        synonyms: Other synsets that share a word with a class: wnid -> (lemmas, the classes' wnids).
    """

    wnids: tuple[str, ...] = dataclasses.field(repr=False)
    lemmas: Mapping[str, tuple[str, ...]] = dataclasses.field(repr=False)
    parents: Mapping[str, tuple[str, ...]] = dataclasses.field(repr=False)
    synonyms: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = dataclasses.field(repr=False,
                                                                                        default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.wnids) != NUM_CLASSES or len(set(self.wnids)) != NUM_CLASSES:
            raise ValueError(f"an ImageNet-1k hierarchy needs {NUM_CLASSES} distinct wnids, got {len(self.wnids)}")
        index = {wnid: i for i, wnid in enumerate(self.wnids)}
        covers: dict[str, set[int]] = {wnid: set() for wnid in self.lemmas}
        kind: dict[str, str] = {}
        for wnid in self.lemmas:
            up = _closure([wnid], lambda w: self.parents.get(w, ()))
            if wnid in index:
                kind[wnid] = CLASS
                covers[wnid].add(index[wnid])
                for ancestor in up:
                    covers[ancestor].add(index[wnid])
            else:
                below = sorted(index[a] for a in up if a in index)
                if below:  # a synset under one or more classes
                    kind[wnid] = NARROWER
                    covers[wnid].update(below)
        for wnid, classes in covers.items():
            if wnid not in kind and classes:
                kind[wnid] = GROUP
        # key -> kind -> {wnid: rank}; rank 0: the full name or wnid, 1: the first lemma, 2: another lemma
        keys: dict[str, dict[str, dict[str, int]]] = {}
        for wnid, k in kind.items():
            lemmas = self.lemmas[wnid]
            names = [(", ".join(lemma.replace("_", " ") for lemma in lemmas), 0), (wnid, 0), (lemmas[0], 1)]
            for name, rank in [*names, *((lemma, 2) for lemma in lemmas[1:])]:
                key = _normalize(name)
                for form in (key, _compact(key)):
                    ranks = keys.setdefault(form, {}).setdefault(k, {})
                    ranks[wnid] = min(rank, ranks.get(wnid, rank))
        synonym_of: dict[str, frozenset[int]] = {}
        for wnid, (lemmas, classes) in self.synonyms.items():
            synonym_of[wnid] = frozenset(index[c] for c in classes if c in index)
            for lemma in lemmas:
                key = _normalize(lemma)
                for form in (key, _compact(key)):
                    keys.setdefault(form, {}).setdefault(SYNONYM, {})[wnid] = 2
        heads: dict[str, set[int]] = {}  # the last word of every class lemma -> those classes
        for wnid in self.wnids:
            for lemma in self.lemmas[wnid]:
                heads.setdefault(_normalize(lemma).rpartition(" ")[2], set()).add(index[wnid])
        set_ = object.__setattr__  # frozen: the derived indexes are set once, here
        set_(self, "_index", index)
        set_(self, "_covers", {**synonym_of, **{w: frozenset(c) for w, c in covers.items() if w in kind}})
        set_(self, "_heads", {h: frozenset(c) for h, c in heads.items()})
        set_(self, "_kind", kind)
        set_(self, "_keys", keys)
        set_(self, "_names", tuple(self.name(wnid) for wnid in self.wnids))
        # the spaced lemmas, for "did you mean" suggestions
        set_(self, "_spelled", sorted({_normalize(lemma) for wnid in kind for lemma in self.lemmas[wnid]}))

    @property
    def names(self) -> tuple[str, ...]:
        """The 1000 human class names in class-index order, e.g. ``"ant, emmet, pismire"``."""
        return self._names  # type: ignore[attr-defined]

    def name(self, wnid: str) -> str:
        """A synset's human name: its lemmas joined by ", " (ImageNet's class names are these)."""
        return ", ".join(lemma.replace("_", " ") for lemma in self.lemmas[wnid])

    def classes_under(self, wnid: str) -> frozenset[int]:
        """The class indices a synset stands for: itself, the classes below it, or the class(es) above it."""
        return self._covers.get(wnid, frozenset())  # type: ignore[attr-defined]

    def kind(self, wnid: str) -> str | None:
        """`CLASS`, `GROUP` (a synset above classes), `NARROWER` (below a class), `SYNONYM` (another sense of a
        class's word), or None (not in the data)."""
        if wnid in self.synonyms:
            return SYNONYM
        return self._kind.get(wnid)  # type: ignore[attr-defined]

    def name_of(self, wnid: str) -> str:
        """`name` for the synsets of the hierarchy and for the synonym senses."""
        if wnid in self.synonyms:
            return ", ".join(lemma.replace("_", " ") for lemma in self.synonyms[wnid][0])
        return self.name(wnid)

    def lookup(self, key: str) -> dict[str, dict[str, int]]:
        """The synsets whose lemma, full name or wnid normalises to `key`: ``{kind: {wnid: rank}}``.

        The kinds are `CLASS`, `GROUP` and `NARROWER`; the rank says how the key names the synset: 0 its full
        name ("ant, emmet, pismire", or one with a single lemma) or wnid, 1 its first lemma, 2 another lemma.
        """
        return self._keys.get(key, {})  # type: ignore[attr-defined]

    def suggestions(self, name: str, n: int = 3) -> list[str]:
        """The known names closest in spelling to `name` (for "did you mean" messages)."""
        return difflib.get_close_matches(_normalize(name), self._spelled, n=n, cutoff=0.75)  # type: ignore[attr-defined]

    def resolve(self, name: str, *, spelling: bool = True) -> _Match | None:
        """What one user class name names, or None when nothing: see the module docstring for the order."""
        key = _normalize(name)
        if not key:
            return None
        found = self._resolve_key(key)
        if found is None and " " in key:  # "stop sign": the one class whose name ends in the same noun ("street sign")
            head = key.rpartition(" ")[2]
            for form in [head, *_singulars(head)]:
                classes = self._heads.get(form)  # type: ignore[attr-defined]
                if classes and len(classes) == 1:  # "other dogs" ends like 20 classes: no reading
                    return _Match(indices=classes, kind=HEAD, wnids=tuple(self.wnids[i] for i in sorted(classes)))
        if found is None and spelling and len(key) >= 8:  # "gravel" is not a misspelt "gavel"
            close = difflib.get_close_matches(key, self._spelled, n=1, cutoff=_SPELLING_CUTOFF)  # type: ignore[attr-defined]
            match = self.resolve(close[0], spelling=False) if close else None
            if match is not None:
                return dataclasses.replace(match, kind=SPELLING, spelled=close[0])
        return found

    def _resolve_key(self, key: str) -> _Match | None:
        plurals = [key + "s", key + "es"]  # "binocular": ImageNet says "binoculars"
        forms = _unique(f for form in [key, *_singulars(key), *plurals] for f in (form, _ALIASES.get(form, form)))
        for form in _unique([*forms, *map(_compact, forms)]):
            found = self.lookup(form)
            for kind in _KINDS:
                if kind not in found:
                    continue
                ranks = found[kind]
                shadowed: list[str] = []
                if kind == CLASS:
                    # the class this is the name of beats one it is only a synonym of ("partridge", not the ruffed
                    # grouse); both are worth a note, and so is a group the class hides ("plane": the tool, not
                    # the aircraft)
                    best = min(ranks.values())
                    shadowed = [w for w, rank in sorted(ranks.items()) if rank > best] + sorted(found.get(GROUP, ()))
                    ranks = {w: rank for w, rank in ranks.items() if rank == best}
                wnids = tuple(sorted(ranks))
                indices = frozenset().union(*(self.classes_under(w) for w in wnids))
                return _Match(indices=indices, kind=kind, wnids=wnids, shadowed=tuple(shadowed))
        return None


@dataclasses.dataclass(frozen=True)
class _Match:
    """One user class name resolved: the class indices, how (`kind`), via which synsets, and what it hid."""

    indices: frozenset[int]
    kind: str
    wnids: tuple[str, ...]
    shadowed: tuple[str, ...] = ()
    spelled: str = ""  # a `SPELLING` match: the name it was read as


@functools.lru_cache(maxsize=1)
def load_imagenet() -> ImageNetHierarchy:
    """The ImageNet-1k hierarchy shipped with embedfit (read once per process).

    Raises:
        InputError: The data file is missing or damaged (a broken install).
    """
    try:
        raw = resources.files("embedfit").joinpath(_DATA).read_bytes()
        doc = json.loads(gzip.decompress(raw))
        synsets = doc["synsets"]
        return ImageNetHierarchy(
            wnids=tuple(doc["classes"]),
            lemmas={wnid: tuple(lemmas) for wnid, (lemmas, _) in synsets.items()},
            parents={wnid: tuple(parents) for wnid, (_, parents) in synsets.items()},
            synonyms={wnid: (tuple(lemmas), tuple(classes))
                      for wnid, (lemmas, classes) in doc.get("synonyms", {}).items()},
        )
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        raise InputError(f"cannot read embedfit's ImageNet class data ({_DATA}): {exc}; reinstall embedfit") from exc


# ---------------------------------------------------------------------------------------------------------
# The mapping


@dataclasses.dataclass(frozen=True)
class ClassMapping:
    """A data set's classes mapped onto ImageNet-1k class indices.

    Attributes:
        class_names: The user's classes, in label order.
        indices: Per class, the sorted ImageNet-1k indices it stands for (empty when unmapped).
        imagenet_names: Per class, the human names of those ImageNet classes.
        matched: Per class, how its name was read ("class ...", "group ...", "narrower ...", "CSV"), or "".
        unmapped: The classes that name no ImageNet class.
        conflicts: ``(class_a, class_b, shared ImageNet indices)`` for each pair of classes that share one.
        notes: Readings a person may want to check ("planes" taken as the carpenter's plane, ...).
        source: Where the mapping came from: "class names" or the CSV file's path.
    """

    class_names: tuple[str, ...]
    indices: tuple[tuple[int, ...], ...]
    imagenet_names: tuple[tuple[str, ...], ...]
    matched: tuple[str, ...]
    unmapped: tuple[str, ...] = ()
    conflicts: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
    notes: tuple[str, ...] = ()
    source: str = "class names"

    @property
    def applicable(self) -> bool:
        """True when every class maps onto at least one ImageNet class and no two classes share one."""
        return bool(self.class_names) and not self.unmapped and not self.conflicts

    @property
    def reason(self) -> str:
        """Why the mapping is not applicable, in one line naming the classes; "" when it is."""
        if self.applicable:
            return ""
        if not self.class_names:
            return "no classes to map"
        parts = []
        if self.unmapped:
            parts.append(f"no ImageNet class for {_quoted(self.unmapped)}")
        for a, b, shared in self.conflicts:
            parts.append(f"{a!r} and {b!r} share ImageNet {_count(len(shared), 'class', 'classes')} "
                         f"{_shown(shared, self._name)}")
        if self.source == "class names":
            return f"class names do not map onto ImageNet classes: {'; '.join(parts)}; " \
                   "rename the folders or give an `imagenet_map` CSV"
        return f"`imagenet_map` {self.source}: {'; '.join(parts)}; fix the CSV"

    def _name(self, index: int) -> str:
        for indices, names in zip(self.indices, self.imagenet_names, strict=True):
            if index in indices:
                return names[indices.index(index)]
        return str(index)

    def to_dict(self) -> dict[str, Any]:
        """The mapping as plain JSON types: per class its ImageNet indices, names and how it matched."""
        return {
            "applicable": self.applicable,
            "reason": self.reason,
            "source": self.source,
            "classes": {c: {"imagenet": list(i), "names": list(n), "matched": m}
                        for c, i, n, m in zip(self.class_names, self.indices, self.imagenet_names, self.matched,
                                              strict=True)},
            "unmapped": list(self.unmapped),
            "conflicts": [{"classes": [a, b], "imagenet": list(shared)} for a, b, shared in self.conflicts],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        """`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def mapped(self) -> tuple[str, ...]:
        """The classes that map onto ImageNet classes no other class shares: what a partial as-is can score."""
        clashing = {c for a, b, _ in self.conflicts for c in (a, b)}
        return tuple(c for c in self.class_names if c not in self.unmapped and c not in clashing)

    def subset(self) -> ClassMapping:
        """The mapping restricted to `mapped` (applicable whenever one class maps), notes and source kept."""
        keep = [i for i, c in enumerate(self.class_names) if c in self.mapped]
        return dataclasses.replace(
            self, class_names=tuple(self.class_names[i] for i in keep), indices=tuple(self.indices[i] for i in keep),
            imagenet_names=tuple(self.imagenet_names[i] for i in keep),
            matched=tuple(self.matched[i] for i in keep), unmapped=(), conflicts=())

    def lookup_table(self) -> np.ndarray:
        """ImageNet index -> class index (-1 for an ImageNet class no class maps to), shape (1000,).

        Raises:
            UsageError: The mapping is not applicable.
        """
        if not self.applicable:
            raise UsageError(self.reason)
        table = np.full(NUM_CLASSES, -1, dtype=np.int64)
        for c, indices in enumerate(self.indices):
            table[list(indices)] = c
        return table


def map_classes(class_names: Sequence[str], imagenet: ImageNetHierarchy | None = None) -> ClassMapping:
    """Map each class name onto the ImageNet-1k classes it names, the way a person would read it.

    See the module docstring for the rules. "ants" and "bees" map to classes 310 ("ant, emmet, pismire") and
    309 ("bee"); "dogs" and "cats" to the 118 dog breeds and the 13 felines; "widgets" to nothing.

    Args:
        class_names: The data set's class names (folder names), in label order.
        imagenet: The hierarchy to map onto; the shipped ImageNet-1k one by default.

    Returns:
        The mapping; check `ClassMapping.applicable` (and show `reason` when it is not).

    Raises:
        UsageError: `class_names` is a single string or holds non-strings.
    """
    names = _check_names(class_names)
    imagenet = imagenet or load_imagenet()
    matches = [imagenet.resolve(name) for name in names]
    sets = [set(m.indices) if m else set() for m in matches]
    notes: list[str] = []

    # A class named outright beats a group that contains it ("tabby" and "cats": the group keeps the rest).
    for c, m in enumerate(matches):
        if m is None or m.kind != GROUP:
            continue
        for d, other in enumerate(matches):
            taken = sets[c] & set(other.indices) if other is not None and other.kind != GROUP else set()
            if taken and taken != sets[c]:
                sets[c] -= taken
                notes.append(f"{names[c]!r} leaves {_shown(sorted(taken), imagenet.names.__getitem__)} "
                             f"to {names[d]!r}")

    matched: list[str] = []
    for name, m in zip(names, matches, strict=True):
        if m is None:
            matched.append("")
            near = imagenet.suggestions(name)
            if near:
                notes.append(f"{name!r} names no ImageNet class; close: {_quoted(near)}")
            continue
        what = " / ".join(f"{imagenet.name_of(w)!r} ({w})" for w in m.wnids)
        shown = _shown(sorted(m.indices), imagenet.names.__getitem__)
        matched.append({CLASS: f"class {what}", GROUP: f"group {what}: {_classes(len(m.indices))}",
                        NARROWER: f"narrower {what}: a kind of {shown}",
                        SYNONYM: f"synonym {what}: another sense of {shown}",
                        HEAD: f"head noun: {shown}",
                        SPELLING: f"spelling {m.spelled!r}: {shown}"}[m.kind])
        if m.kind in (SYNONYM, HEAD, SPELLING):
            notes.append(f"{name!r} read as {shown} ({m.kind}{f' {m.spelled!r}' if m.spelled else ''}): "
                         "check it, or use --imagenet-map to choose")
        if m.kind == CLASS and len(m.indices) > 1:
            notes.append(f"{name!r} names {len(m.indices)} ImageNet classes: {what}")
        if m.shadowed:
            alt = "; ".join(_describe(imagenet, w) for w in m.shadowed[:3])
            notes.append(f"{name!r} read as {what}; it can also mean {alt}: use --imagenet-map to choose")
    return _build(names, sets, matched, notes, imagenet, source="class names")


def load_imagenet_map_csv(
    path: str | os.PathLike, class_names: Sequence[str], imagenet: ImageNetHierarchy | None = None
) -> ClassMapping:
    """Read an explicit class -> ImageNet mapping (the `imagenet_map` CSV of `classify` and `compare`).

    Each row is ``class,imagenet_class``; a class may have several rows (their ImageNet classes add up). The
    ImageNet class is an index 0-999, a wnid (``n02219486``; a wnid above classes, such as dog's
    ``n02084071``, stands for all the classes under it, one below a class for that class), or a name read
    as `map_classes` reads one (a synonym, a full class name, a group word, a plural; a name shared by two
    classes, such as "crane", is refused). An optional first row ``class,imagenet_class`` is a header; blank
    rows and rows starting with ``#`` are skipped.

    Args:
        path: The CSV file.
        class_names: The data set's class names; every one needs a row.
        imagenet: The hierarchy to map onto; the shipped ImageNet-1k one by default.

    Returns:
        The mapping (applicable unless two classes were given the same ImageNet class).

    Raises:
        InputError: The file cannot be read, a row is malformed, names a class the data does not have or an
            ImageNet class that does not exist or is ambiguous, or a class has no row.
        UsageError: `class_names` is a single string or holds non-strings.
    """
    names = _check_names(class_names)
    imagenet = imagenet or load_imagenet()
    shown = os.fspath(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1)]
    except UnicodeDecodeError as exc:
        raise InputError(f"cannot read {shown}: not UTF-8 text (byte {exc.start})") from exc
    except csv.Error as exc:
        raise InputError(f"cannot read {shown}: {exc}") from exc
    except OSError as exc:
        raise InputError(f"cannot read {shown}: {exc.strerror or exc}") from exc

    column = {name: c for c, name in enumerate(names)}
    sets: list[set[int]] = [set() for _ in names]
    how: list[list[str]] = [[] for _ in names]
    for line, row in rows:
        cells = [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if line == 1 and [c.lower() for c in cells] in (["class", "imagenet_class"], ["class", "imagenet"]):
            continue
        if len(cells) != 2 or not all(cells):
            raise InputError(f"{shown} line {line}: expected 'class,imagenet_class', got {','.join(row)!r}")
        name, target = cells
        if name not in column:
            raise InputError(f"{shown} line {line}: class {name!r} is not one of the data's classes "
                             f"({_quoted(names)})")
        sets[column[name]] |= _csv_target(target, imagenet, f"{shown} line {line}")
        how[column[name]].append(target)
    missing = [name for name, got in zip(names, how, strict=True) if not got]
    if missing:
        raise InputError(f"{shown} has no row for {_count(len(missing), 'class', 'classes')} {_quoted(missing)}; "
                         "every class needs at least one 'class,imagenet_class' row")
    matched = [f"CSV {', '.join(targets)}" for targets in how]
    return _build(names, sets, matched, [], imagenet, source=shown)


def _csv_target(target: str, imagenet: ImageNetHierarchy, where: str) -> set[int]:
    """The ImageNet classes one CSV cell names: an index, a wnid or a name (which must not be ambiguous)."""
    if target.isdigit():
        index = int(target)
        if index >= NUM_CLASSES:
            raise InputError(f"{where}: ImageNet class index {index} is out of range 0-{NUM_CLASSES - 1}")
        return {index}
    if _WNID.fullmatch(target.lower()):
        classes = imagenet.classes_under(target.lower())
        if not classes:
            raise InputError(f"{where}: {target} is not the wnid of an ImageNet-1k class, nor of a WordNet synset "
                             "above or below one")
        return set(classes)
    match = imagenet.resolve(target)
    if match is None:
        near = imagenet.suggestions(target)
        hint = f" (close: {_quoted(near)})" if near else ""
        raise InputError(f"{where}: no ImageNet class is called {target!r}{hint}; give an index 0-999 or a wnid")
    if match.kind == CLASS and len(match.indices) > 1:
        options = ", ".join(f"{i} {imagenet.wnids[i]}" for i in sorted(match.indices))
        raise InputError(f"{where}: {target!r} names {len(match.indices)} ImageNet classes ({options}); "
                         "give the index or wnid of the one you mean")
    return set(match.indices)


def _build(
    names: list[str],
    sets: list[set[int]],
    matched: list[str],
    notes: list[str],
    imagenet: ImageNetHierarchy,
    source: str,
) -> ClassMapping:
    """Assemble a `ClassMapping`, finding the unmapped classes and the pairs that share ImageNet classes."""
    indices = [tuple(sorted(s)) for s in sets]
    unmapped = tuple(name for name, m in zip(names, matched, strict=True) if not m)
    conflicts = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            shared = sets[a] & sets[b]
            if shared:
                conflicts.append((names[a], names[b], tuple(sorted(shared))))
    return ClassMapping(
        class_names=tuple(names),
        indices=tuple(indices),
        imagenet_names=tuple(tuple(imagenet.names[i] for i in idx) for idx in indices),
        matched=tuple(matched),
        unmapped=unmapped,
        conflicts=tuple(conflicts),
        notes=tuple(notes),
        source=source,
    )


# ---------------------------------------------------------------------------------------------------------
# Predictions


def restricted_predict(probs: np.ndarray, mapping: ClassMapping) -> tuple[np.ndarray, np.ndarray]:
    """Predict the user's classes from ImageNet probabilities restricted to the mapped ImageNet classes.

    Each class's probability is the sum of the model's softmax probabilities over its ImageNet classes,
    renormalised over the user's classes (a row whose mapped classes all have probability 0 becomes uniform).

    Args:
        probs: Softmax probabilities over the 1000 ImageNet classes, shape (N, 1000).
        mapping: An applicable mapping.

    Returns:
        ``(pred, class_probs)``: the index into ``mapping.class_names`` per image, shape (N,), and the
        renormalised class probabilities, shape (N, C).

    Raises:
        UsageError: `probs` is not (N, 1000) or holds negative values, or the mapping is not applicable.
    """
    probs = _check_probs(probs)
    if not mapping.applicable:
        raise UsageError(mapping.reason)
    summed = np.stack([probs[:, list(idx)].sum(axis=1) for idx in mapping.indices], axis=1)
    total = summed.sum(axis=1, keepdims=True)
    n_classes = len(mapping.indices)
    class_probs = np.divide(summed, total, out=np.full_like(summed, 1.0 / n_classes), where=total > 0)
    return class_probs.argmax(axis=1), class_probs


def top1_mapped(probs: np.ndarray, mapping: ClassMapping) -> np.ndarray:
    """The plain top-1 over all 1000 ImageNet classes, mapped back to the user's classes.

    Reported beside `restricted_predict`: the model's own answer, without knowing the user's classes.

    Args:
        probs: Probabilities (or logits) over the 1000 ImageNet classes, shape (N, 1000).
        mapping: An applicable mapping.

    Returns:
        The index into ``mapping.class_names`` per image, -1 where the top-1 ImageNet class is none of theirs.

    Raises:
        UsageError: `probs` is not (N, 1000), or the mapping is not applicable.
    """
    probs = _check_probs(probs, probabilities=False)
    return mapping.lookup_table()[probs.argmax(axis=1)]


def _check_probs(probs: np.ndarray, probabilities: bool = True) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES:
        raise UsageError(f"expected ImageNet scores of shape (N, {NUM_CLASSES}), got {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        probs = probs.astype(np.float64)
    if probabilities and (probs < 0).any():
        raise UsageError("expected softmax probabilities (non-negative), got negative values: are these logits?")
    return probs


# ---------------------------------------------------------------------------------------------------------
# Names


def _normalize(text: str) -> str:
    """Lower case, no accents or apostrophes/periods, every other run of non-alphanumerics one space."""
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return " ".join(_SEPARATORS.split(_DROPPED.sub("", text.lower()))).strip()


def _compact(key: str) -> str:
    """A normalised key without spaces ("goldenretriever"), for names written without separators."""
    return key.replace(" ", "")


def _singulars(key: str) -> list[str]:
    """Singular candidates for a normalised name, by its last word, most likely first (may be non-words)."""
    head, _, word = key.rpartition(" ")
    prefix = f"{head} " if head else ""
    candidates: list[str] = []
    if word in _IRREGULAR:
        candidates.append(_IRREGULAR[word])
    if word.endswith("men") and len(word) > 3:
        candidates.append(word[:-3] + "man")  # firemen, snowmen
    if word.endswith("ies") and len(word) > 4:
        candidates += [word[:-3] + "y", word[:-1]]  # butterflies; collies, cookies
    if word.endswith("ves"):
        candidates += [word[:-3] + "f", word[:-3] + "fe", word[:-1]]  # wolves, knives, olives
    if word.endswith(("ches", "shes", "sses", "xes", "zes", "oes")):
        candidates.append(word[:-2])  # boxes, dishes, glasses, potatoes
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        candidates.append(word[:-1])  # dogs, horses
    if word.endswith("es") and len(word) > 3:
        candidates.append(word[:-2])  # buses
    if word.endswith("i") and len(word) > 3:
        candidates.append(word[:-1] + "us")  # cacti, fungi
    if word.endswith("ae") and len(word) > 3:
        candidates.append(word[:-1])  # larvae
    if word.endswith("a") and len(word) > 3:
        candidates.append(word[:-1] + "um")  # aquaria
    return [prefix + c for c in _unique(candidates) if c and c != word]


def _check_names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str):
        raise UsageError("`class_names` must be a sequence of names, not a single string")
    names = list(class_names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise UsageError(f"class names must be strings, got {bad[0]!r}")
    return names


def _closure(start: Iterable[str], step) -> set[str]:
    """Every node reachable from `start` by `step`, `start` included."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(step(node))
    return seen


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _quoted(items: Iterable[str]) -> str:
    return ", ".join(map(repr, items))


def _count(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def _describe(imagenet: ImageNetHierarchy, wnid: str) -> str:
    """"'bee' (class 309)", "'dog, ...' (n02084071, a group of 118 classes)" or "'fire ant' (n02221083, a kind of
    class 310)"."""
    classes = sorted(imagenet.classes_under(wnid))
    if imagenet.kind(wnid) == CLASS:
        return f"{imagenet.name(wnid)!r} (class {classes[0]})"
    if imagenet.kind(wnid) == GROUP:
        return f"{imagenet.name(wnid)!r} ({wnid}, a group of {_classes(len(classes))})"
    return f"{imagenet.name(wnid)!r} ({wnid}, a kind of {_count(len(classes), 'class', 'classes')} " \
           f"{', '.join(map(str, classes))})"


def _classes(n: int) -> str:
    return f"{n} {_count(n, 'class', 'classes')}"


def _shown(indices: Sequence[int], name, limit: int = 3) -> str:
    """`indices` with their first names, the first `limit` of them: "281 'tabby', 282 'tiger cat', ... (+4 more)"."""
    shown = ", ".join(f"{i} {name(i).split(', ')[0]!r}" for i in indices[:limit])
    return shown + (f" (+{len(indices) - limit} more)" if len(indices) > limit else "")


__all__ = [
    "CLASS",
    "GROUP",
    "NARROWER",
    "NUM_CLASSES",
    "ClassMapping",
    "ImageNetHierarchy",
    "load_imagenet",
    "load_imagenet_map_csv",
    "map_classes",
    "restricted_predict",
    "top1_mapped",
]
