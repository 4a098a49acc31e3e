"""The import rule of the README ("Which layer imports which"), checked on the source.

Layers, lowest first; a module imports only from its own layer or below:
  0 pure      rewards/, rlsys/lang/, the pure parts of rlsys/data/ and rlsys/grpo/, sft losses,
              actors/weight_digest.py: no Ray, vLLM, DeepSpeed or W&B anywhere in them
  1 support   rlsys/config.py, models.py, tracking.py, data preparation, eval drawing
  2 actors    actors/ (Ray actors and their driver-side groups)
  3 programs  the GRPO controller and run, SFT, eval, Serve
  4 tools     the demo, the benchmarks, every __main__
Project imports are at module level. The exceptions, each for start-up time: a program imports
actors/ inside the function that starts the actors (actors/ import Ray at module level), and
rlsys/serve/__init__.py loads the Serve app when Ray Serve asks for it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("rlsys", "actors", "rewards")
HEAVY = ("ray", "vllm", "deepspeed", "wandb")

LAYERS = [  # (layer, path prefixes), first match wins
    (4, ("rlsys/demo.py", "rlsys/bench/")),
    (
        0,
        (
            "rewards/",
            "rlsys/lang/",
            "rlsys/data/samples.py",
            "rlsys/data/images.py",
            "rlsys/data/synthetic.py",
            "rlsys/data/__init__.py",
            "rlsys/grpo/__init__.py",
            "rlsys/grpo/algorithm.py",
            "rlsys/grpo/records.py",
            "rlsys/grpo/timing.py",
            "rlsys/grpo/metrics.py",
            "rlsys/grpo/pipeline.py",
            "rlsys/grpo/checkpoints.py",
            "rlsys/grpo/sequences.py",
            "rlsys/grpo/attention.py",
            "rlsys/grpo/lora.py",
            "rlsys/sft/__init__.py",
            "rlsys/sft/losses.py",
            "rlsys/__init__.py",
            "actors/weight_digest.py",
            "actors/__init__.py",
        ),
    ),
    (
        1,
        (
            "rlsys/config.py",
            "rlsys/models/",
            "rlsys/tracking.py",
            "rlsys/jit_builds.py",
            "rlsys/data/prepare.py",
            "rlsys/data/proposals.py",
            "rlsys/eval/__init__.py",
            "rlsys/eval/drawing.py",
        ),
    ),
    (2, ("actors/",)),
    (3, ("rlsys/grpo/", "rlsys/sft/", "rlsys/eval/", "rlsys/serve/")),
]
LAZY_OK = {"rlsys/serve/__init__.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for top in PROJECT:
        for p in (ROOT / top).rglob("*.py"):
            rel = p.relative_to(ROOT).as_posix()
            name = rel[:-3].replace("/", ".").removesuffix(".__init__")
            out[name] = p
    return out


def layer_of(rel: str) -> int:
    if rel.endswith("__main__.py"):
        return 4
    for layer, prefixes in LAYERS:
        if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in prefixes):
            return layer
    raise AssertionError(f"{rel} is in no layer of tests/test_import_rule.py: place it")


def _imports(tree: ast.Module):
    """(module imported, node, at module level?) for every import."""
    top = {id(n) for n in tree.body}
    # imports under a module-level if/try still run at import time
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(m) for m in ast.walk(n)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # "from rlsys.data import synthetic" imports the module rlsys.data.synthetic: both
            # are yielded, and the caller keeps the longest name that is a module
            for a in node.names:
                yield f"{node.module}.{a.name}", node, id(node) in top


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` is or lies in ("rlsys.config.load_config" -> "rlsys.config")."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _graph():
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for name, path in modules.items():
        rel = path.relative_to(ROOT).as_posix()
        mine = layer_of(rel)
        tree = ast.parse(path.read_text(), filename=rel)
        for imported, node, at_top in _imports(tree):
            root = imported.split(".")[0]
            if root in HEAVY and mine == 0:
                problems.append(f"{rel}:{node.lineno}: a pure module imports {imported}")
            if root not in PROJECT:
                continue
            target = _resolve(imported, modules)
            if target is None or target == name:
                continue
            theirs = layer_of(modules[target].relative_to(ROOT).as_posix())
            if theirs > mine:
                problems.append(f"{rel}:{node.lineno}: layer {mine} imports {target} of layer {theirs}")
            if at_top:
                edges[name].add(target)
            elif not (root == "actors" and not name.startswith("actors")) and rel not in LAZY_OK:
                problems.append(f"{rel}:{node.lineno}: import of {imported} inside a function (put it at module level)")
    return edges, problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_every_import_follows_the_layer_rule():
    _, problems = _graph()
    assert not problems, "\n".join(problems)


def test_the_project_has_no_import_cycle():
    edges, _ = _graph()
    # a package imports its submodules' parents implicitly: package -> submodule edges are not cycles
    assert _cycles(edges) == []


def test_the_rule_catches_what_it_forbids(tmp_path):
    # the checker itself: a pure module importing Ray, an upward import and a function-local one
    src = "import ray\nfrom rlsys.grpo.trainer import Trainer\n\ndef f():\n    from rlsys.config import load_config\n"
    tree = ast.parse(src)
    found = [(m, top) for m, _, top in _imports(tree)]
    assert ("ray", True) in found and ("rlsys.grpo.trainer.Trainer", True) in found
    assert ("rlsys.config.load_config", False) in found
    assert layer_of("rlsys/lang/vocab.py") == 0 and layer_of("rlsys/grpo/trainer.py") == 3
    assert layer_of("actors/rollout.py") == 2 and layer_of("rlsys/grpo/__main__.py") == 4
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
