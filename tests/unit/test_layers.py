"""The package's layering is a checked contract: no module imports a higher layer, and no import circle.

Every `import` in every module under src/sftlab counts, the ones deferred into functions and under
TYPE_CHECKING included (read with ast, so nothing is imported and no import-linter is needed). Importing
`a.b.c` also runs the package `a.b`'s __init__, so that counts as an import of it too.

The one upward reference by design: the registries config.py validates against (registry.METHODS and
registry.PROBES) name the package that fills them as a string, imported on the first lookup; that is how
config.py reads them without importing the packages that register (DESIGN: config is data).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "sftlab"

# Top to bottom. A module belongs to the longest entry that is it or a package above it; a module may import
# its own layer and the layers below, never one above. A new module must be placed here.
LAYERS: list[list[str]] = [
    ["sftlab.docs"],  # generates docs/ from the config dataclasses and the CLI's parser (reads cli, above all)
    ["sftlab.cli"],
    ["sftlab.demo"],
    # a study composes arenas, interpolation and analysis into findings
    ["sftlab.study"],
    # sftlab compare: paired changes between points of runs or a pipeline's stages (reads the pipeline's selection)
    ["sftlab.compare"],
    # applications over runs: each reads run directories or drives training
    # export: the chosen point as adapter, merged folder or GGUF, with a model card that draws the report's plane
    ["sftlab.arena", "sftlab.report", "sftlab.pipeline", "sftlab.analysis", "sftlab.data.inspect", "sftlab.export"],
    # budget solving counts a built model's trainable parameters with the trainer's own report (the rules it
    # counts with, budget_rules, are part of each method's registration: in the methods layer)
    ["sftlab.methods.budget"],
    # the training loop, and rewinding along the path it wrote
    # forgetting remedies hook into the loop (which imports them) and use rewinding's interpolation (WiSE-FT)
    ["sftlab.train", "sftlab.rewinding", "sftlab.interpolate", "sftlab.remedies"],
    ["sftlab.scoring"],
    ["sftlab.runs"],
    # run-directory storage and process groups, below everything that reads or writes a run
    ["sftlab.train.checkpoint", "sftlab.train.sharding", "sftlab.train.shardspec", "sftlab.train.deepspeed"],
    ["sftlab.methods", "sftlab.probes"],
    ["sftlab.assets"],
    ["sftlab.models", "sftlab.tokens"],
    ["sftlab.fetch"],  # models fetched on demand (Gemma-3-270M); conversion is passed in by models/cli
    ["sftlab.quantize", "sftlab.objectives"],
    ["sftlab.data", "sftlab.trajectory"],
    ["sftlab.config", "sftlab.config_scale", "sftlab.config_vision", "sftlab.config_objective"],
    # the run directory's files and line formats (stdlib only): every reader and writer of a run goes through it
    ["sftlab.rundir_format"],
    ["sftlab.configtools", "sftlab.registry", "sftlab.errors", "sftlab.faults", "sftlab.resources",
     "sftlab.cache"],
]

# Import circles in today's code that are not fixed yet. This list must only shrink.
ALLOWED_CYCLES: list[set[str]] = [
    # The Ray backend runs runner.run_trial inside each Ray worker, and the runner picks the Ray backend when
    # arena.backend is ray: both deferred. Fix: move run_trial (the per-trial work) into its own module that
    # both import.
    {"sftlab.arena.runner", "sftlab.arena.ray_backend"},
]


def modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package __init__)"""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_pkg: bool, known) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    # `from pkg import x` imports the module pkg.x when there is one, else takes x from pkg
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in known.items():
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, name, is_pkg, known):
                if target != PACKAGE and not target.startswith(PACKAGE + "."):
                    continue
                while target not in known:  # an attribute of a module: the module
                    target = target.rsplit(".", 1)[0]
                parts = target.split(".")
                for i in range(2, len(parts) + 1):  # the packages above it run first
                    up = ".".join(parts[:i])
                    if up in known and up != name and not name.startswith(up + "."):
                        edges.add(up)
    return graph


def layer_of(name: str) -> int | None:
    best, found = -1, None
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if (name == entry or name.startswith(entry + ".")) and len(entry) > best:
                best, found = len(entry), i
    return found


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(comp)
    return found


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m != PACKAGE and layer_of(m) is None]
    assert not missing, f"place these modules in LAYERS (tests/unit/test_layers.py): {missing}"
    entries = [e for layer in LAYERS for e in layer]
    assert len(entries) == len(set(entries)), "a LAYERS entry is listed twice"
    stale = [e for e in entries if not any(m == e or m.startswith(e + ".") for m in modules())]
    assert not stale, f"LAYERS names modules that no longer exist: {stale}"


def test_the_package_root_imports_nothing_of_its_own():
    assert not import_graph()[PACKAGE]


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    wrong = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            above, below = layer_of(name), layer_of(target)  # None: not placed yet (the test above says so)
            if name != PACKAGE and above is not None and below is not None and below < above:
                wrong.append(f"{name} (layer {above}) imports {target} (layer {below})")
    assert not wrong, "imports against the layering (LAYERS, top = 0):\n" + "\n".join(wrong)


def test_no_import_circle():
    found = cycles(import_graph())
    new = [sorted(c) for c in found if c not in ALLOWED_CYCLES]
    assert not new, f"import circles: {new}"
    gone = [sorted(c) for c in ALLOWED_CYCLES if c not in found]
    assert not gone, f"these circles are gone: remove them from ALLOWED_CYCLES: {gone}"


def test_the_checker_sees_deferred_imports_and_circles():
    """The checker itself: a function-level import is an edge, and a two-module circle is found."""
    tree = ast.parse("def f():\n    from .runs import Run\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _targets(node, "sftlab.scoring", False, modules()) == ["sftlab.runs"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_config_reads_registries_that_name_their_packages():
    from sftlab.registry import METHODS, PROBES, REMEDIES

    assert (METHODS.provider, PROBES.provider, REMEDIES.provider) == ("sftlab.methods", "sftlab.probes",
                                                                      "sftlab.remedies")
    graph = import_graph()["sftlab.config"]
    assert not {"sftlab.methods", "sftlab.probes", "sftlab.remedies"} & graph
    assert "lora" in METHODS and "kl_to_base" in PROBES and "l2sp" in REMEDIES
