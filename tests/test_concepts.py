"""The concept graph and the manipulator (cfgen/concepts.py): loading FM-CGM's JSON, do() and captions."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from cfgen.concepts import ConceptGraph, Edit
from cfgen.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def concept(cid: str, name: str, value: str | None = None) -> dict:
    out = {"id": cid, "name": name, "description": f"the {name}"}
    if value is not None:
        out["current_value"] = value
    return out


def edge(rid: str, cause: str, effect: str) -> dict:
    return {"id": rid, "cause_id": cause, "effect_id": effect, "description": f"{cause} drives {effect}"}


def chain() -> dict:
    """A -> B -> C and D on its own; A in {a0, a1, a2}, B = A's index mod 2, C = not B."""
    return {
        "concepts": [concept("c1", "A", "a0"), concept("c2", "B", "b0"), concept("c3", "C", "c1"),
                     concept("c4", "D", "d0")],
        "relationships": [edge("r1", "c1", "c2"), edge("r2", "c2", "c3")],
        "scene_summary": "a chain and a loner",
        "cfgen": {
            "domains": {"A": {"a0": "A0", "a1": "A1", "a2": "A2"}, "B": {"b0": "B0", "b1": "B1"},
                        "C": {"c0": "C0", "c1": "C1"}, "D": {"d0": "D0", "d1": "D1"}},
            "mechanisms": {"B": {"parents": ["A"], "table": {"a0": "b0", "a1": "b1", "a2": "b0"}},
                           "C": {"parents": ["B"], "table": {"b0": "c1", "b1": "c0"}}},
            "caption": "{A} then {B} then {C}, {D} apart",
        },
    }


def diamond() -> dict:
    """T -> L, T -> R, (L, R) -> J: J = 'on' only when both L and R are 'on'."""
    on_off = {"on": "on", "off": "off"}
    return {
        "concepts": [concept("c1", "T"), concept("c2", "L"), concept("c3", "R"), concept("c4", "J")],
        "relationships": [edge("r1", "c1", "c2"), edge("r2", "c1", "c3"), edge("r3", "c2", "c4"),
                          edge("r4", "c3", "c4")],
        "scene_summary": "a diamond",
        "cfgen": {
            "domains": {"T": {"up": "up", "down": "down"}, "L": on_off, "R": on_off, "J": on_off},
            "mechanisms": {
                "L": {"parents": ["T"], "table": {"up": "on", "down": "off"}},
                "R": {"parents": ["T"], "table": {"up": "on", "down": "on"}},
                "J": {"parents": ["L", "R"], "table": {"on": {"on": "on", "off": "off"},
                                                       "off": {"on": "off", "off": "off"}}},
            },
            "caption": "{T}: {L} {R} -> {J}",
        },
    }


CHAIN_STATE = {"A": "a0", "B": "b0", "C": "c1", "D": "d0"}


def test_do_propagates_down_the_chain_by_the_tables_and_leaves_the_rest():
    g = ConceptGraph.from_dict(chain())
    iv = g.do(CHAIN_STATE, "A", "a1")
    # a1 -> b1 by B's table, b1 -> c0 by C's; D is no descendant of A
    assert iv.after == {"A": "a1", "B": "b1", "C": "c0", "D": "d0"}
    assert iv.before == CHAIN_STATE and iv.before is not CHAIN_STATE
    assert iv.edits == (Edit("A", "a0", "a1", "intervened"), Edit("B", "b0", "b1", "propagated from A"),
                        Edit("C", "c1", "c0", "propagated from B"))
    assert iv.changed == {"A", "B", "C"}
    # a2 -> b0 again: B keeps its value, so nothing below it moves
    iv = g.do(CHAIN_STATE, "A", "a2")
    assert iv.after == {**CHAIN_STATE, "A": "a2"} and iv.edits == (Edit("A", "a0", "a2", "intervened"),)
    # do(B): C follows, A (an ancestor) and D stay
    iv = g.do(CHAIN_STATE, "B", "b1")
    assert iv.after == {"A": "a0", "B": "b1", "C": "c0", "D": "d0"}
    # do(D): only D
    assert g.do(CHAIN_STATE, "D", "d1").after == {**CHAIN_STATE, "D": "d1"}
    # setting the value a concept already has is no edit at all
    iv = g.do(CHAIN_STATE, "A", "a0")
    assert iv.after == CHAIN_STATE and iv.edits == ()


def test_a_descendant_whose_parents_did_not_change_keeps_its_factual_value():
    # C = c0 disagrees with its table (b0 -> c1): something exogenous set it, and abduction keeps that
    g = ConceptGraph.from_dict(chain())
    odd = {**CHAIN_STATE, "C": "c0"}
    assert g.do(odd, "A", "a2").after == {**odd, "A": "a2"}    # B unchanged, so C stays c0
    assert g.do(odd, "A", "a1").after["C"] == "c0"              # B -> b1 and its table says c0 anyway
    assert g.do(odd, "A", "a1").changed == {"A", "B"}


def test_diamond_recomputes_the_join_from_both_parents():
    g = ConceptGraph.from_dict(diamond())
    assert g.order == ("T", "L", "R", "J")
    up = {"T": "up", "L": "on", "R": "on", "J": "on"}
    iv = g.do(up, "T", "down")   # L -> off, R stays on, J = table[off][on] = off
    assert iv.after == {"T": "down", "L": "off", "R": "on", "J": "off"}
    assert iv.edits == (Edit("T", "up", "down", "intervened"), Edit("L", "on", "off", "propagated from T"),
                        Edit("J", "on", "off", "propagated from L"))
    # both parents moved: the cause names both
    iv = g.do({"T": "down", "L": "off", "R": "off", "J": "off"}, "T", "up")
    assert iv.after == up
    assert iv.edits[-1] == Edit("J", "off", "on", "propagated from L, R")
    # do(L) reaches J alone; T and R are not below L
    iv = g.do(up, "L", "off")
    assert iv.after == {"T": "up", "L": "off", "R": "on", "J": "off"}


def test_descendants_and_non_descendants_by_hand():
    g = ConceptGraph.from_dict(chain())
    assert g.descendants("A") == {"B", "C"} and g.non_descendants("A") == {"D"}
    assert g.descendants("B") == {"C"} and g.non_descendants("B") == {"A", "D"}
    assert g.descendants("C") == set() and g.non_descendants("C") == {"A", "B", "D"}
    assert g.descendants("D") == set() and g.non_descendants("D") == {"A", "B", "C"}
    assert g.children("A") == ("B",) and g.parents["C"] == ("B",) and g.parents["A"] == ()
    d = ConceptGraph.from_dict(diamond())
    assert d.descendants("T") == {"L", "R", "J"} and d.non_descendants("T") == set()
    assert d.descendants("L") == {"J"} and d.non_descendants("L") == {"T", "R"}


def test_topological_order_puts_parents_first_whatever_the_file_order():
    data = chain()
    data["concepts"].reverse()   # D, C, B, A in the file
    g = ConceptGraph.from_dict(data)
    assert g.concepts == ("D", "C", "B", "A")
    assert g.order == ("D", "A", "B", "C")   # ties (D and A are both roots) in file order


def test_captions_render_the_phrases():
    g = ConceptGraph.from_dict(chain())
    assert g.caption(CHAIN_STATE) == "A0 then B0 then C1, D0 apart"
    assert g.caption(g.do(CHAIN_STATE, "A", "a1").after) == "A1 then B1 then C0, D0 apart"
    assert g.phrase("B", "b1") == "B1"
    data = chain()
    data["cfgen"]["caption"] = "{{literal}} {A} {B} {C} {D}"  # doubled braces are text
    assert ConceptGraph.from_dict(data).caption(CHAIN_STATE) == "{literal} A0 B0 C1 D0"


def test_an_fm_cgm_extractor_graph_with_cfgen_block_loads_from_a_file(tmp_path):
    # the extractor's output (paper, Figure 2) for a street scene, verbatim in its fields, plus cfgen's block
    extracted = {
        "concepts": [
            {"id": "c1", "name": "weather", "current_value": "sunny", "description": "The sky's weather."},
            {"id": "c2", "name": "road surface", "current_value": "dry road",
             "description": "Whether the road is wet."},
            {"id": "c3", "name": "pedestrian gear", "current_value": "no umbrella",
             "description": "What the pedestrians carry."},
            {"id": "c4", "name": "car colour", "current_value": "red car", "description": "The colour of the car."},
        ],
        "relationships": [
            {"id": "r1", "cause_id": "c1", "effect_id": "c2", "description": "Rain wets the road."},
            {"id": "r2", "cause_id": "c1", "effect_id": "c3", "description": "Rain makes people carry umbrellas."},
        ],
        "scene_summary": "A red car on a dry road on a sunny day.",
    }
    extracted["cfgen"] = {
        "domains": {
            "weather": {"sunny": "on a sunny day", "rainy": "on a rainy day"},
            "road surface": {"dry road": "a dry road", "wet road": "a wet road"},
            "pedestrian gear": {"no umbrella": "people without umbrellas", "umbrella": "people with umbrellas"},
            "car colour": {"red car": "a red car", "blue car": "a blue car"},
        },
        "mechanisms": {
            "road surface": {"parents": ["weather"], "table": {"sunny": "dry road", "rainy": "wet road"}},
            "pedestrian gear": {"parents": ["weather"], "table": {"sunny": "no umbrella", "rainy": "umbrella"}},
        },
        "caption": "{car colour} on {road surface}, {pedestrian gear}, {weather}",
    }
    path = tmp_path / "street.graph.json"
    path.write_text(json.dumps(extracted))
    g = ConceptGraph.load(path)
    assert g.ids == {"weather": "c1", "road surface": "c2", "pedestrian gear": "c3", "car colour": "c4"}
    assert g.current == {"weather": "sunny", "road surface": "dry road", "pedestrian gear": "no umbrella",
                         "car colour": "red car"}
    assert g.caption(g.current) == "a red car on a dry road, people without umbrellas, on a sunny day"
    iv = g.do(g.current, "weather", "rainy")
    assert g.caption(iv.after) == "a red car on a wet road, people with umbrellas, on a rainy day"
    # the record has the manipulator's (Figure 3) fields
    record = iv.to_json()
    assert record["target_concept_name"] == "weather" and record["new_value"] == "rainy"
    assert record["original_value"] == "sunny"
    assert [c["concept_name"] for c in record["propagated_changes"]] == ["road surface", "pedestrian gear"]
    assert record["propagated_changes"][0] == {"concept_name": "road surface", "original_value": "dry road",
                                               "new_value": "wet road", "reason": "propagated from weather"}
    assert record["final_concept_states"]["car colour"] == "red car"
    json.dumps(record)


def test_the_shipped_shapes_text_graph_loads():
    g = ConceptGraph.load(ROOT / "pipelines" / "shapes-text.graph.json")
    assert g.concepts == ("shape", "colour", "environment", "size")
    assert g.descendants("shape") == {"colour"} and g.non_descendants("shape") == {"environment", "size"}
    assert g.caption(g.current) == "a small red circle on a sand background"


def _broken(mutate) -> dict:
    data = copy.deepcopy(chain())
    mutate(data)
    return data


def _set(path: list, value):
    def mutate(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _delete(path: list):
    def mutate(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


MALFORMED = [
    ("no concepts", _delete(["concepts"]), "top level: missing key 'concepts'"),
    ("no relationships", _delete(["relationships"]), "top level: missing key 'relationships'"),
    ("no cfgen block", _delete(["cfgen"]), "no 'cfgen' block"),
    ("a concept without a name", _delete(["concepts", 1, "name"]), "concepts[1]: missing key 'name'"),
    ("a duplicate id", _set(["concepts", 1, "id"], "c1"), "concepts[1].id: 'c1' is used twice"),
    ("an edge to an unknown concept", _set(["relationships", 1, "effect_id"], "c9"),
     "relationships[1].effect_id: 'c9' is not a concept id"),
    ("an edge without a cause", _delete(["relationships", 0, "cause_id"]), "relationships[0]: missing key 'cause_id'"),
    ("a cycle", lambda d: d["relationships"].append(edge("r3", "c3", "c1")),
     "the relationships have a cycle: A -> B -> C -> A"),
    ("a self-loop", lambda d: d["relationships"].append(edge("r3", "c4", "c4")), "'D' causes itself"),
    ("a concept without a domain", _delete(["cfgen", "domains", "D"]), "cfgen.domains: concept 'D' has no domain"),
    ("a current value outside its domain", _set(["concepts", 0, "current_value"], "a7"),
     "current_value 'a7' of 'A' is not in its domain (a0, a1, a2)"),
    ("an edge with no mechanism", _delete(["cfgen", "mechanisms", "C"]),
     "cfgen.mechanisms: the edge B -> C has no mechanism"),
    ("a mechanism on a root", _set(["cfgen", "mechanisms", "D"], {"parents": [], "table": {}}),
     "cfgen.mechanisms.D: 'D' has no parents"),
    ("mechanism parents that are not the edges", _set(["cfgen", "mechanisms", "C", "parents"], ["A"]),
     "cfgen.mechanisms.C.parents: ['A'] but the relationships give 'C' the parents ['B']"),
    ("a mechanism missing a parent value", _delete(["cfgen", "mechanisms", "B", "table", "a2"]),
     "cfgen.mechanisms.B.table: no entry for A = 'a2'"),
    ("a mechanism value outside the child's domain", _set(["cfgen", "mechanisms", "B", "table", "a1"], "b7"),
     "cfgen.mechanisms.B.table['a1']: 'b7' is not a value of 'B' (b0, b1)"),
    ("a mechanism key outside the parent's domain", _set(["cfgen", "mechanisms", "B", "table", "a9"], "b0"),
     "cfgen.mechanisms.B.table: 'a9' is not a value of 'A'"),
    ("a caption naming no concept", _set(["cfgen", "caption"], "{A} {B} {C} {D} {E}"),
     "cfgen.caption: {E} is not a concept"),
    ("a caption leaving a concept out", _set(["cfgen", "caption"], "{A} {B} {C}"),
     "cfgen.caption: '{A} {B} {C}' has no {D}"),
    ("a caption with a stray brace", _set(["cfgen", "caption"], "{A} {B} {C} {D"), "cfgen.caption: "),
]


@pytest.mark.parametrize("name, mutate, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_graph_is_one_line_naming_the_file_and_the_problem(tmp_path, name, mutate, message):
    path = tmp_path / "bad.graph.json"
    path.write_text(json.dumps(_broken(mutate)))
    with pytest.raises(ConfigError) as err:
        ConceptGraph.load(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"concept graph {path}: ")
    assert message in text


def test_a_file_that_is_not_json_or_not_there(tmp_path):
    path = tmp_path / "bad.graph.json"
    path.write_text('{"concepts": [,]}')
    with pytest.raises(ConfigError, match=r"^concept graph .*bad\.graph\.json: not JSON: Expecting value at line 1 "
                                          r"column 15$"):
        ConceptGraph.load(path)
    with pytest.raises(ConfigError, match="concept graph: file not found: .*missing.json"):
        ConceptGraph.load(tmp_path / "missing.json")
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ConceptGraph.load(path)


def test_do_refuses_unknown_concepts_values_and_incomplete_states():
    g = ConceptGraph.from_dict(chain())
    with pytest.raises(ConfigError, match=r"^unknown concept 'E' \(concepts: A, B, C, D\)$"):
        g.do(CHAIN_STATE, "E", "e0")
    with pytest.raises(ConfigError, match=r"^A: 'a9' is not one of its values \(a0, a1, a2\)$"):
        g.do(CHAIN_STATE, "A", "a9")
    with pytest.raises(ConfigError, match=r"missing \['D'\]"):
        g.do({"A": "a0", "B": "b0", "C": "c1"}, "A", "a1")
    with pytest.raises(ConfigError, match="B: 'b5' is not one of its values"):
        g.caption({**CHAIN_STATE, "B": "b5"})


def test_a_nested_table_missing_a_combination_names_the_path_to_it():
    data = diamond()
    del data["cfgen"]["mechanisms"]["J"]["table"]["on"]["off"]
    with pytest.raises(ConfigError, match=r"cfgen\.mechanisms\.J\.table\['on'\]: no entry for R = 'off'$"):
        ConceptGraph.from_dict(data, where="diamond.json")



@pytest.mark.parametrize("parents, follows", [(["L", "R"], "L"), (["R", "L"], "R")])
def test_a_nested_table_is_keyed_in_the_order_of_its_parents(parents, follows):
    data = diamond()
    # J copies its first-listed parent: the outer key is that parent's value
    data["cfgen"]["mechanisms"]["J"] = {"parents": parents, "table": {"on": {"on": "on", "off": "on"},
                                                                      "off": {"on": "off", "off": "off"}}}
    g = ConceptGraph.from_dict(data)
    assert g.parents["J"] == tuple(parents)
    after = g.do({"T": "up", "L": "on", "R": "on", "J": "on"}, "T", "down").after   # L -> off, R stays on
    assert after["J"] == after[follows]
