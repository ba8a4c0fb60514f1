"""Class names -> ImageNet-1k classes, on the shipped WordNet data (no mocks)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import embedfit
from embedfit.errors import InputError, UsageError
from embedfit.training.imagenet_classes import (
    CLASS,
    GROUP,
    NARROWER,
    ClassMapping,
    ImageNetHierarchy,
    load_imagenet,
    load_imagenet_map_csv,
    map_classes,
    restricted_predict,
    top1_mapped,
)

pytestmark = pytest.mark.fast

DATA = Path(embedfit.__file__).parent / "data" / "imagenet_hierarchy.json.gz"
DOGS = set(range(151, 269))  # ImageNet-1k's 118 dog breeds
FELINES = set(range(281, 294))  # tabby ... cheetah


@pytest.fixture(scope="module")
def imagenet() -> ImageNetHierarchy:
    return load_imagenet()


def one(name: str) -> tuple[int, ...]:
    """The ImageNet indices one class name maps to."""
    return map_classes([name]).indices[0]


# --- the shipped data -------------------------------------------------------------------------------------


def test_data_file_is_small_and_carries_the_wordnet_licence():
    assert DATA.stat().st_size < 300_000
    doc = json.loads(gzip.decompress(DATA.read_bytes()))
    assert "Princeton University" in doc["licence"] and "WordNet 3.0" in doc["licence"]
    assert len(doc["classes"]) == 1000


def test_classes_are_timms_imagenet_classes_in_order(imagenet):
    # timm's own ImageNet-1k metadata, read from its files (importing timm would pull in torch)
    info = Path(importlib.util.find_spec("timm").origin).parent / "data" / "_info"
    assert imagenet.wnids == tuple((info / "imagenet_synsets.txt").read_text().split())
    lemma = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    assert imagenet.names == tuple(lemma[w] for w in imagenet.wnids)
    assert imagenet.names[310] == "ant, emmet, pismire" and imagenet.names[309] == "bee"


def test_hierarchy_rejects_a_class_list_that_is_not_imagenet_1k(imagenet):
    with pytest.raises(ValueError, match="1000 distinct"):
        ImageNetHierarchy(wnids=imagenet.wnids[:999], lemmas=imagenet.lemmas, parents=imagenet.parents)


# --- map_classes ------------------------------------------------------------------------------------------


def test_ants_and_bees_the_issue():
    m = map_classes(["ants", "bees"])
    assert m.applicable, m.reason
    assert m.reason == ""
    assert m.indices == ((310,), (309,))
    assert m.imagenet_names == (("ant, emmet, pismire",), ("bee",))
    assert m.unmapped == () and m.conflicts == ()


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("Golden_Retriever", 207), ("golden retriever", 207), ("golden-retrievers", 207), ("GoldenRetriever", 207),
        ("pismire", 310), ("Emmets", 310), ("ANT", 310), ("n02219486", 310), ("ant, emmet, pismire", 310),
        ("geese", 99), ("mice", 673), ("collies", 231), ("St. Bernard", 247), ("Saint_Bernards", 247),
        ("jack-o-lanterns", 607), ("teddy_bears", 850), ("Siamese cats", 284), ("lions", 291), ("bananas", 954),
        ("crayfish", 124), ("partridge", 86), ("harps", 594),
        ("fire_ants", 310), ("honeybees", 309),  # narrower names: a fire ant is an ImageNet ant
    ],
)
def test_one_name_one_class(name, index):
    assert one(name) == (index,)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dogs", DOGS), ("dog", DOGS), ("Puppies", DOGS), ("n02084071", DOGS),  # dog's wnid
        ("cats", FELINES),  # both WordNet "cat"s: house cats and wildcats, and the big cats
        ("butterflies", set(range(321, 327))), ("wolves", set(range(269, 273))), ("foxes", set(range(277, 281))),
        ("kittens", set(range(281, 286))),  # domestic cats
    ],
)
def test_group_names_map_to_the_classes_below(name, expected):
    assert set(one(name)) == expected


def test_groups_have_sensible_sizes(imagenet):
    sizes = {name: len(one(name)) for name in ["birds", "fish", "snakes", "cars", "insects", "monkeys", "boxes"]}
    assert sizes["birds"] == 59 and sizes["fish"] == 16 and sizes["snakes"] == 17
    assert all(1 < size < 100 for size in sizes.values()), sizes
    assert 436 in one("cars") and 817 in one("cars")  # beach wagon, sports car
    assert set(one("animals")) == set(range(398))  # ImageNet-1k's first 398 classes are the animals


def test_dogs_and_cats_do_not_overlap():
    m = map_classes(["dogs", "cats"])
    assert m.applicable, m.reason
    dogs, cats = map(set, m.indices)
    assert dogs == DOGS and len(dogs) == 118
    assert 281 in cats and cats == FELINES  # tabby
    assert not dogs & cats
    assert m.matched[0].startswith(GROUP) and "n02084071" in m.matched[0]
    assert m.imagenet_names[1][0] == "tabby, tabby cat"


def test_a_named_class_beats_a_group_that_contains_it():
    m = map_classes(["cats", "tabby"])
    assert m.applicable, m.reason
    assert m.indices[1] == (281,) and m.matched[1].startswith(CLASS)
    assert set(m.indices[0]) == FELINES - {281}
    assert any("'cats' leaves 281 'tabby'" in note for note in m.notes)
    m = map_classes(["Golden_Retriever", "other dogs", "dogs"])
    assert m.unmapped == ("other dogs",)
    assert set(m.indices[2]) == DOGS - {207}


def test_an_unmappable_name_makes_the_mapping_not_applicable():
    m = map_classes(["widgets", "ants"])
    assert not m.applicable
    assert m.unmapped == ("widgets",)
    assert m.indices == ((), (310,)) and m.matched[0] == ""
    assert "'widgets'" in m.reason and "`imagenet_map`" in m.reason and "\n" not in m.reason
    with pytest.raises(UsageError, match="widgets"):
        m.lookup_table()


@pytest.mark.parametrize(
    ("name", "index", "kind"),
    [
        ("rooster", 7, "synonym"),  # WordNet's "cock, rooster": another sense of the class "cock"
        ("roosters", 7, "synonym"),
        ("binocular", 447, "class"),  # ImageNet has only the plural "binoculars"
        ("stop_sign", 919, "head noun"),  # "street sign" alone ends in "sign"
        ("Dalmation", 251, "spelling"),  # the common misspelling of "dalmatian"
        ("golden retreiver", 207, "spelling"),
    ],
)
def test_synonyms_plurals_head_nouns_and_spellings(name, index, kind):
    m = map_classes([name])
    assert m.applicable and m.indices == ((index,),)
    assert m.matched[0].startswith(kind)
    if kind != "class":  # a looser reading is worth a look
        assert any(note.startswith(f"{name!r} read as {index} ") for note in m.notes)


def test_looser_readings_do_not_invent_classes():
    m = map_classes(["water_lilly", "other dogs", "widget box", "ants"])
    assert m.unmapped == ("water_lilly", "other dogs", "widget box")  # ImageNet has no water lily


def test_the_classes_that_map_form_an_applicable_subset():
    m = map_classes(["rooster", "water_lilly", "ants", "pismire", "bees"])
    assert not m.applicable
    assert m.mapped == ("rooster", "bees")  # 'ants' and 'pismire' share class 310
    sub = m.subset()
    assert sub.applicable and sub.class_names == ("rooster", "bees") and sub.indices == ((7,), (309,))
    pred, _ = restricted_predict(np.eye(1000)[[7, 309]], sub)
    assert pred.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("names", "pair", "shared"),
    [
        (["ants", "pismire"], ("ants", "pismire"), {310}),  # two names of one class
        (["birds", "animals"], ("birds", "animals"), None),  # a group inside a group
        (["fish", "sharks"], ("fish", "sharks"), {2, 3, 4}),
        (["ants", "Ants"], ("ants", "Ants"), {310}),
    ],
)
def test_overlapping_classes_are_a_conflict(names, pair, shared):
    m = map_classes(names)
    assert not m.applicable
    assert [c[:2] for c in m.conflicts] == [pair]
    if shared is not None:
        assert set(m.conflicts[0][2]) == shared
    assert f"{pair[0]!r} and {pair[1]!r} share ImageNet" in m.reason


def test_a_class_hiding_another_meaning_gets_a_note():
    m = map_classes(["planes"])
    assert m.indices == ((726,),)  # the carpenter's plane: a class beats the aircraft group
    assert any("airplane" in note and "--imagenet-map" in note for note in m.notes)
    m = map_classes(["cranes"])  # the bird and the machine share the name
    assert m.indices == ((134, 517),)
    assert any("2 ImageNet classes" in note for note in m.notes)


def test_every_imagenet_name_round_trips(imagenet):
    """Each class's full name, wnid and each of its synonyms maps back to it (a shared synonym to all its owners)."""
    owners: dict[str, set[int]] = {}
    for i, wnid in enumerate(imagenet.wnids):
        for lemma in imagenet.lemmas[wnid]:
            owners.setdefault(lemma.lower(), set()).add(i)
    full = map_classes(imagenet.names)
    crane = {134, 517}  # two classes called just "crane"
    for i, indices in enumerate(full.indices):
        assert indices == (tuple(sorted(crane)) if i in crane else (i,)), imagenet.names[i]
    assert [c[:2] for c in full.conflicts] == [("crane", "crane")]
    assert map_classes(imagenet.wnids).indices == tuple((i,) for i in range(1000))
    for i, wnid in enumerate(imagenet.wnids):
        for lemma in imagenet.lemmas[wnid]:
            (indices,) = map_classes([lemma], imagenet).indices
            if len(owners[lemma.lower()]) == 1:
                assert indices == (i,), (lemma, i)
            else:
                assert set(indices) <= owners[lemma.lower()] and indices, (lemma, i)


def test_to_json_and_to_dict():
    m = map_classes(["ants", "bees", "widgets"])
    d = json.loads(m.to_json())
    assert d == m.to_dict()
    assert d["applicable"] is False and d["unmapped"] == ["widgets"]
    assert d["classes"]["ants"] == {"imagenet": [310], "names": ["ant, emmet, pismire"], "matched": m.matched[0]}
    assert d["source"] == "class names"


def test_class_mapping_is_frozen():
    m = map_classes(["ants"])
    assert isinstance(m, ClassMapping)
    with pytest.raises(AttributeError):
        m.unmapped = ("x",)  # type: ignore[misc]


def test_bad_class_name_arguments():
    with pytest.raises(UsageError, match="single string"):
        map_classes("ants")
    with pytest.raises(UsageError, match="strings"):
        map_classes(["ants", 3])  # type: ignore[list-item]


def test_narrower_kind_is_reported():
    m = map_classes(["fire ants"])
    assert m.matched[0].startswith(NARROWER) and "fire ant" in m.matched[0]


# --- load_imagenet_map_csv ----------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "map.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_mapping_by_index_wnid_and_name(tmp_path):
    path = write(tmp_path, "class,imagenet_class\n"
                           "formicidae,310\n"
                           "apis,n02206856\n"
                           "retrievers,golden retriever\n"
                           "retrievers,Labrador_retriever\n"
                           "# a comment\n\n"
                           "canines,n02084071\n")  # a wnid above classes: all of them
    m = load_imagenet_map_csv(path, ["formicidae", "apis", "retrievers", "canines"])
    assert m.source == str(path)
    assert m.indices[:3] == ((310,), (309,), (207, 208))
    assert set(m.indices[3]) == DOGS
    assert not m.applicable and m.conflicts == (("retrievers", "canines", (207, 208)),)
    ok = write(tmp_path, "formicidae,ant\napis,bees\n")  # no header; plural names
    m = load_imagenet_map_csv(ok, ["formicidae", "apis"])
    assert m.applicable and m.indices == ((310,), (309,))
    assert m.matched == ("CSV ant", "CSV bees")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ants,310\nbees\n", r"line 2: expected 'class,imagenet_class'"),
        ("ants,310,309\nbees,309\n", r"line 1: expected"),
        ("ants,310\nbees,\n", r"line 2: expected"),
        ("ants,310\nwasps,309\n", r"line 2: class 'wasps' is not one of the data's classes"),
        ("ants,310\n", r"no row for class 'bees'"),
        ("ants,1000\nbees,309\n", r"line 1: ImageNet class index 1000 is out of range 0-999"),
        ("ants,n99999999\nbees,309\n", r"line 1: n99999999 is not the wnid of an ImageNet-1k class"),
        ("ants,widget\nbees,309\n", r"line 1: no ImageNet class is called 'widget'"),
        ("ants,crane\nbees,309\n", r"line 1: 'crane' names 2 ImageNet classes \(134 n02012849, 517 n03126707\)"),
    ],
)
def test_csv_errors_are_one_line(tmp_path, text, message):
    with pytest.raises(InputError, match=message) as info:
        load_imagenet_map_csv(write(tmp_path, text), ["ants", "bees"])
    assert "\n" not in str(info.value)


def test_csv_that_cannot_be_read(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_imagenet_map_csv(tmp_path / "missing.csv", ["ants"])
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("ants,caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        load_imagenet_map_csv(bad, ["ants"])


# --- predictions ------------------------------------------------------------------------------------------


def probabilities(*rows: dict[int, float]) -> np.ndarray:
    probs = np.zeros((len(rows), 1000))
    for r, row in enumerate(rows):
        for index, p in row.items():
            probs[r, index] = p
    return probs


def test_restricted_predict_sums_and_renormalises():
    m = map_classes(["dogs", "cats"])
    probs = probabilities(
        {151: 0.3, 152: 0.3, 281: 0.35, 999: 0.05},  # dogs win summed, though the top-1 is a tabby
        {999: 0.9, 285: 0.06, 200: 0.04},  # mostly toilet tissue: cats 0.06 vs dogs 0.04
        {},  # no mass on any mapped class: uniform
    )
    pred, class_probs = restricted_predict(probs, m)
    assert pred.tolist() == [0, 1, 0]
    np.testing.assert_allclose(class_probs, [[0.6 / 0.95, 0.35 / 0.95], [0.4, 0.6], [0.5, 0.5]])
    assert class_probs.shape == (3, 2)
    assert top1_mapped(probs[:2], m).tolist() == [1, -1]


def test_top1_mapped_takes_logits_too():
    m = map_classes(["ants", "bees"])
    logits = np.full((3, 1000), -5.0)
    logits[0, 310], logits[1, 309], logits[2, 0] = 2.0, 1.0, 3.0
    assert top1_mapped(logits, m).tolist() == [0, 1, -1]
    table = m.lookup_table()
    assert table[310] == 0 and table[309] == 1 and (table >= 0).sum() == 2


def test_predictions_refuse_bad_input():
    m = map_classes(["ants", "bees"])
    with pytest.raises(UsageError, match=r"shape \(N, 1000\)"):
        restricted_predict(np.ones((2, 10)), m)
    with pytest.raises(UsageError, match="logits"):
        restricted_predict(np.full((1, 1000), -1.0), m)
    with pytest.raises(UsageError, match="widgets"):
        restricted_predict(np.ones((1, 1000)) / 1000, map_classes(["ants", "widgets"]))
    with pytest.raises(UsageError, match="widgets"):
        top1_mapped(np.ones((1, 1000)), map_classes(["ants", "widgets"]))
