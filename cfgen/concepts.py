"""The concept graph and the concept manipulator (FM-CGM, ../shared/seeds/fm-cgm-paper.txt, Sec. 5.1-5.2).

    graph = ConceptGraph.load("pipelines/shapes-text.graph.json")
    state = {"shape": "circle", "colour": "red", "environment": "sand", "size": "small"}
    iv = graph.do(state, "shape", "square")
    iv.after        # {"shape": "square", "colour": "blue", "environment": "sand", "size": "small"}
    iv.edits        # (Edit("shape", "circle", "square", "intervened"),
                    #  Edit("colour", "red", "blue", "propagated from shape"))
    graph.caption(iv.after)   # "a small blue square on a sand background"

The file is the JSON FM-CGM's concept extractor (its Figure 2) returns, so a graph a VLM wrote
elsewhere can be dropped in, plus one key of cfgen's own, "cfgen": what a reasoning model would
otherwise be asked at every intervention (the manipulator, Figure 3), written down once:

    {
      "concepts": [                                   # the extractor's fields; current_value optional
        {"id": "c1", "name": "shape",  "current_value": "circle", "description": "..."},
        {"id": "c2", "name": "colour", "current_value": "red",    "description": "..."}
      ],
      "relationships": [                              # cause_id -> effect_id, a DAG
        {"id": "r1", "cause_id": "c1", "effect_id": "c2", "description": "..."}
      ],
      "scene_summary": "...",                         # optional
      "cfgen": {
        "domains": {                                  # every concept: value -> its caption phrase
          "shape":  {"circle": "circle", "square": "square"},
          "colour": {"red": "red", "blue": "blue"}
        },
        "mechanisms": {                               # every concept with parents: its table
          "colour": {"parents": ["shape"], "table": {"circle": "red", "square": "blue"}}
        },
        "caption": "a {colour} {shape}"               # {concept name} -> that concept's phrase
      }
    }

Inside "cfgen", concepts are named by `name` (what `do` and the template use); relationships
keep the extractor's ids. A child with several parents has a nested table, one level per parent
in the order of "parents": {"parents": ["a", "b"], "table": {"a1": {"b1": "c", "b2": "d"}, ...}},
and every combination of parent values must be there: a gap would leave a counterfactual undefined.

`do(state, c, v)` is a hard intervention: c is set to v, then every descendant of c, in topological
order, whose parents changed is recomputed by its table; a descendant none of whose parents changed
keeps its value (whatever made it differ from its table, the exogenous part, is kept, as abduction
keeps it); non-descendants are never touched. Any defect of the file is one line, a ConfigError
naming the file: the CLI prints `cfgen: error: ...` and exits 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from string import Formatter

from cfgen.errors import ConfigError

INTERVENED = "intervened"


@dataclass(frozen=True)
class Edit:
    """One concept's change under an intervention."""
    concept: str
    old: str
    new: str
    cause: str
    """'intervened', or 'propagated from <parent>[, <parent>...]': the parents that changed."""


@dataclass(frozen=True)
class Intervention:
    """do(concept = value) applied to a state: the states before and after and every change, in order."""
    concept: str
    value: str
    before: dict[str, str]
    after: dict[str, str]
    edits: tuple[Edit, ...]
    """The intervened concept first (absent if it already had the value), then propagated changes."""

    @property
    def changed(self) -> set[str]:
        return {e.concept for e in self.edits}

    def to_json(self) -> dict:
        """The record in the shape of FM-CGM's concept manipulator output (one of its "interventions")."""
        return {"target_concept_name": self.concept, "original_value": self.before[self.concept],
                "new_value": self.value,
                "propagated_changes": [{"concept_name": e.concept, "original_value": e.old, "new_value": e.new,
                                        "reason": e.cause} for e in self.edits if e.cause != INTERVENED],
                "final_concept_states": dict(self.after)}


@dataclass(frozen=True)
class ConceptGraph:
    """Concepts with finite domains, a DAG over them, a table per child, and a caption template."""
    concepts: tuple[str, ...]
    """Concept names, in the file's order."""
    domains: dict[str, dict[str, str]]
    """concept -> {value: caption phrase}, values in the file's order."""
    parents: dict[str, tuple[str, ...]]
    """concept -> its parents, in the order its mechanism's table is nested ((): a root)."""
    mechanisms: dict[str, dict[tuple[str, ...], str]]
    """child -> {tuple of parent values (in `parents` order): child value}, complete."""
    template: str
    """The caption: '{name}' is replaced by the phrase of that concept's value."""
    order: tuple[str, ...]
    """Topological order: parents before children, ties in file order."""
    ids: dict[str, str] = field(default_factory=dict)
    """concept name -> the extractor's id (c1, c2, ...)."""
    current: dict[str, str] = field(default_factory=dict)
    """The extractor's current_value of each concept that has one (the scene it was read from)."""

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> ConceptGraph:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"concept graph: file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"concept graph {path}: unreadable: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"concept graph {path}: not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data, where: str = "<dict>") -> ConceptGraph:
        """The graph of a parsed file; `where` names it in errors. Read part by part (_GraphFile), each
        part checked against the ones before it, so an error names the first thing that is wrong."""
        f = _GraphFile(where)
        raw_concepts, raw_edges, extra = f.top_level(data)
        names, ids, current = f.concepts(raw_concepts)
        parents = f.edges(raw_edges, names, ids)
        order = _topological(names, parents, f.fail)
        domains = f.domains(extra, names, current)
        ordered_parents, mechanisms = f.mechanisms(extra, names, parents, domains)
        template = f.caption(extra, names)
        return cls(concepts=tuple(names), domains=domains, parents=ordered_parents, mechanisms=mechanisms,
                   template=template, ids=ids, current=current, order=order)

    # -- structure -------------------------------------------------------------------------------

    def children(self, concept: str) -> tuple[str, ...]:
        self._check_concept(concept)
        return tuple(c for c in self.concepts if concept in self.parents[c])

    def descendants(self, concept: str) -> set[str]:
        """Every concept reachable from `concept` along the edges (not itself)."""
        out, todo = set(), list(self.children(concept))
        while todo:
            c = todo.pop()
            if c not in out:
                out.add(c)
                todo.extend(self.children(c))
        return out

    def non_descendants(self, concept: str) -> set[str]:
        """Every concept that an intervention on `concept` must leave as it is (not itself)."""
        return set(self.concepts) - self.descendants(concept) - {concept}

    # -- intervention and captions ---------------------------------------------------------------

    def check_state(self, state: dict[str, str]) -> None:
        """ConfigError unless `state` gives every concept (and nothing else) a value of its domain."""
        missing = [c for c in self.concepts if c not in state]
        unknown = [c for c in state if c not in self.domains]
        if missing or unknown:
            raise ConfigError(f"concept state: missing {missing}, unknown {unknown} "
                              f"(concepts: {', '.join(self.concepts)})")
        for c in self.concepts:
            self._check_value(c, state[c])

    def do(self, state: dict[str, str], concept: str, value: str, propagate: bool = True) -> Intervention:
        """do(concept = value) on `state`, propagated to the descendants (see the module docstring).
        propagate=False changes the concept alone, as an edit that ignores the graph would."""
        self._check_concept(concept)
        self._check_value(concept, value)
        self.check_state(state)
        after = dict(state)
        edits = []
        if state[concept] != value:
            after[concept] = value
            edits.append(Edit(concept, state[concept], value, INTERVENED))
        below = self.descendants(concept) if propagate else set()
        for c in self.order:
            if c not in below:
                continue
            moved = [p for p in self.parents[c] if after[p] != state[p]]
            if not moved:  # no parent changed: the factual value, whatever set it, stands
                continue
            new = self.mechanisms[c][tuple(after[p] for p in self.parents[c])]
            if new != after[c]:
                edits.append(Edit(c, after[c], new, "propagated from " + ", ".join(moved)))
                after[c] = new
        return Intervention(concept, value, dict(state), after, tuple(edits))

    def phrase(self, concept: str, value: str) -> str:
        self._check_value(concept, value)
        return self.domains[concept][value]

    def caption(self, state: dict[str, str]) -> str:
        """The template with each {concept} replaced by the phrase of its value in `state`."""
        self.check_state(state)
        out = []
        for literal, name, _, _ in Formatter().parse(self.template):
            out.append(literal)
            if name is not None:
                out.append(self.domains[name][state[name]])
        return "".join(out)

    def _check_concept(self, concept: str) -> None:
        if concept not in self.domains:
            raise ConfigError(f"unknown concept {concept!r} (concepts: {', '.join(self.concepts)})")

    def _check_value(self, concept: str, value: str) -> None:
        self._check_concept(concept)
        if value not in self.domains[concept]:
            raise ConfigError(f"{concept}: {value!r} is not one of its values ({', '.join(self.domains[concept])})")


def check_edges(candidate: ConceptGraph, own: ConceptGraph, source: str) -> None:
    """A ConfigError for an edge of `candidate` between two concepts of the source's own graph `own` that
    `own` does not have. The source's graph is what its data's generator does (shapes-captioned: no
    shape -> environment edge, the train split's correlation being selection, not mechanism), and the
    oracle judges each pair by it: a do(shape) propagated along an edge the generator lacks would repaint
    the background and be judged wrong for doing what the graph asked."""
    for child in candidate.concepts:
        for parent in candidate.parents[child]:
            if parent in own.domains and child in own.domains and parent not in own.parents[child]:
                raise ConfigError(f"the concept graph does not fit data.source {source!r}: it has the edge "
                                  f"{parent} -> {child}, which the source says is not there (its data's "
                                  f"{child} does not depend on {parent})")


def class_concept(graph: ConceptGraph, classes: list[str]) -> str | None:
    """The concept whose values are the class names (shapes-text: shape), if any: its value is the class."""
    return next((c for c in graph.concepts if set(graph.domains[c]) == set(classes)), None)


class _GraphFile:
    """The checks of one graph file, part by part; every failure is one line naming the file and the key."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, msg: str):
        raise ConfigError(f"concept graph {self.where}: {msg}")

    def need_key(self, obj, key: str, kind: type, at: str):
        if not isinstance(obj, dict) or key not in obj:
            self.fail(f"{at}: missing key {key!r}")
        if not isinstance(obj[key], kind):
            self.fail(f"{at}.{key}: expected {kind.__name__}, got {type(obj[key]).__name__}")
        return obj[key]

    def top_level(self, data) -> tuple[list, list, dict]:
        if not isinstance(data, dict):
            self.fail(f"expected a JSON object with 'concepts', 'relationships' and 'cfgen', got {type(data).__name__}")
        raw_concepts = self.need_key(data, "concepts", list, "top level")
        raw_edges = self.need_key(data, "relationships", list, "top level")
        if "cfgen" not in data:
            self.fail("no 'cfgen' block: the extractor's output needs cfgen's domains, mechanisms and caption "
                      "(cfgen/concepts.py)")
        extra = self.need_key(data, "cfgen", dict, "top level")
        if not raw_concepts:
            self.fail("concepts: empty")
        return raw_concepts, raw_edges, extra

    def concepts(self, raw_concepts: list) -> tuple[list[str], dict[str, str], dict[str, str]]:
        """Names in file order, name -> id, and the current values the extractor read."""
        names, ids, current = [], {}, {}
        seen_ids: set[str] = set()
        for i, c in enumerate(raw_concepts):
            at = f"concepts[{i}]"
            cid, name = self.need_key(c, "id", str, at), self.need_key(c, "name", str, at)
            if not name.strip() or any(ch in name for ch in "{}:!"):
                self.fail(f"{at}.name: {name!r} cannot be a caption placeholder (empty, or has one of {{ }} : !)")
            if cid in seen_ids:
                self.fail(f"{at}.id: {cid!r} is used twice")
            if name in names:
                self.fail(f"{at}.name: {name!r} is used twice")
            names.append(name)
            seen_ids.add(cid)
            ids[name] = cid
            if "current_value" in c:
                current[name] = self.need_key(c, "current_value", str, at)
        return names, ids, current

    def edges(self, raw_edges: list, names: list[str], ids: dict[str, str]) -> dict[str, list[str]]:
        """concept -> its parents, in the order the relationships list them."""
        by_id = {cid: name for name, cid in ids.items()}
        parents: dict[str, list[str]] = {n: [] for n in names}
        for i, r in enumerate(raw_edges):
            at = f"relationships[{i}]"
            cause, effect = self.need_key(r, "cause_id", str, at), self.need_key(r, "effect_id", str, at)
            for key, cid in (("cause_id", cause), ("effect_id", effect)):
                if cid not in by_id:
                    self.fail(f"{at}.{key}: {cid!r} is not a concept id (ids: {', '.join(by_id)})")
            if cause == effect:
                self.fail(f"{at}: {by_id[cause]!r} causes itself")
            if by_id[cause] in parents[by_id[effect]]:
                self.fail(f"{at}: the edge {by_id[cause]} -> {by_id[effect]} is listed twice")
            parents[by_id[effect]].append(by_id[cause])
        return parents

    def domains(self, extra: dict, names: list[str], current: dict[str, str]) -> dict[str, dict[str, str]]:
        raw_domains = self.need_key(extra, "domains", dict, "cfgen")
        domains: dict[str, dict[str, str]] = {}
        for name in names:
            if name not in raw_domains:
                self.fail(f"cfgen.domains: concept {name!r} has no domain")
            dom = raw_domains[name]
            if not isinstance(dom, dict) or not dom or not all(isinstance(v, str) for v in dom.values()):
                self.fail(f"cfgen.domains.{name}: expected a non-empty object of value -> caption phrase")
            domains[name] = dict(dom)
        for name in raw_domains:
            if name not in names:
                self.fail(f"cfgen.domains: {name!r} is not a concept (concepts: {', '.join(names)})")
        for name, value in current.items():
            if value not in domains[name]:
                self.fail(f"concepts: current_value {value!r} of {name!r} is not in its domain "
                          f"({', '.join(domains[name])})")
        return domains

    def mechanisms(self, extra: dict, names: list[str], parents: dict[str, list[str]],
                   domains: dict[str, dict[str, str]]) -> tuple[dict, dict]:
        """concept -> its parents in its table's nesting order, and child -> complete table."""
        raw_mech = self.need_key(extra, "mechanisms", dict, "cfgen")
        for name in raw_mech:
            if name not in parents:
                self.fail(f"cfgen.mechanisms: {name!r} is not a concept (concepts: {', '.join(names)})")
        mechanisms: dict[str, dict[tuple[str, ...], str]] = {}
        ordered_parents: dict[str, tuple[str, ...]] = {}
        for name in names:
            if not parents[name]:
                if name in raw_mech:
                    self.fail(f"cfgen.mechanisms.{name}: {name!r} has no parents in the relationships, so no mechanism")
                ordered_parents[name] = ()
                continue
            if name not in raw_mech:
                self.fail(f"cfgen.mechanisms: the edge {', '.join(parents[name])} -> {name} has no mechanism "
                          f"(add cfgen.mechanisms.{name})")
            at = f"cfgen.mechanisms.{name}"
            m = raw_mech[name]
            listed = self.need_key(m, "parents", list, at)
            if sorted(map(str, listed)) != sorted(parents[name]) or len(set(listed)) != len(listed):
                self.fail(f"{at}.parents: {listed} but the relationships give {name!r} the parents {parents[name]}")
            ordered_parents[name] = tuple(listed)
            mechanisms[name] = _flatten(self.need_key(m, "table", dict, at), tuple(listed), domains, name, at,
                                        self.fail)
        return ordered_parents, mechanisms

    def caption(self, extra: dict, names: list[str]) -> str:
        template = self.need_key(extra, "caption", str, "cfgen")
        try:
            fields = [f for _, f, _, _ in Formatter().parse(template) if f is not None]
        except ValueError as e:
            self.fail(f"cfgen.caption: {e} in {template!r}")
        for f in fields:
            if f not in names:
                self.fail(f"cfgen.caption: {{{f}}} is not a concept (concepts: {', '.join(names)})")
        for name in names:  # an edit of a concept the caption does not show could never reach the text
            if name not in fields:
                self.fail(f"cfgen.caption: {template!r} has no {{{name}}}")
        return template


def _topological(names: list[str], parents: dict[str, list[str]], fail) -> tuple[str, ...]:
    """Kahn's order, ties broken by file order; a cycle is reported as one, e.g. 'a -> b -> a'."""
    done: list[str] = []
    while len(done) < len(names):
        ready = [n for n in names if n not in done and all(p in done for p in parents[n])]
        if not ready:
            fail("the relationships have a cycle: " + _a_cycle([n for n in names if n not in done], parents))
        done.append(ready[0])
    return tuple(done)


def _a_cycle(left: list[str], parents: dict[str, list[str]]) -> str:
    """One cycle among `left` (nodes each with a parent in `left`), walking up parents until one repeats."""
    path = [left[0]]
    while True:
        up = next(p for p in parents[path[-1]] if p in left)
        if up in path:
            cycle = path[path.index(up):] + [up]
            return " -> ".join(reversed(cycle))
        path.append(up)


def _flatten(table, parents: tuple[str, ...], domains, child: str, at: str, fail) -> dict[tuple[str, ...], str]:
    """The nested table {p1 value: {p2 value: ... child value}} as {(p1 value, p2 value, ...): child value}."""
    out: dict[tuple[str, ...], str] = {}
    for combo in product(*(domains[p] for p in parents)):
        node = table
        for depth, (p, v) in enumerate(zip(parents, combo)):
            if not isinstance(node, dict) or v not in node:
                where = at + ".table" + "".join(f"[{x!r}]" for x in combo[:depth])
                fail(f"{where}: no entry for {p} = {v!r}")
            node = node[v]
        if not isinstance(node, str) or node not in domains[child]:
            where = at + ".table" + "".join(f"[{x!r}]" for x in combo)
            fail(f"{where}: {node!r} is not a value of {child!r} ({', '.join(domains[child])})")
        out[combo] = node
    _no_strays(table, parents, domains, at + ".table", fail)
    return out


def _no_strays(node, parents: tuple[str, ...], domains, at: str, fail) -> None:
    """A key that is not a value of its parent is a typo that would otherwise be silently ignored."""
    if not parents:
        return
    for key, sub in node.items():
        if key not in domains[parents[0]]:
            fail(f"{at}: {key!r} is not a value of {parents[0]!r} ({', '.join(domains[parents[0]])})")
        _no_strays(sub, parents[1:], domains, f"{at}[{key!r}]", fail)
