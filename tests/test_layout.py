"""utils/'s import graph: no circles, and no layer imports one above it (core < data < model < serve < the rest)."""
import ast

from conftest import ROOT

LAYERS = {"core": 0, "data": 1, "model": 2, "serve": 3, "train": 4, "export": 4, "eval": 4}


def import_graph():
    """{module: {utils modules it imports, anywhere in its file}}."""
    files = {}
    for path in (ROOT / "utils").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        files[name] = path
    graph = {}
    for name, path in files.items():
        tree, targets = ast.parse(path.read_text(encoding="utf-8")), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("utils"):
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                            for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("utils")}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def layer(module):
    parts = module.split(".")
    return LAYERS.get(parts[1], -1) if len(parts) > 1 else -1


def test_no_layer_imports_one_above_it():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a)]
    assert upward == []


def test_no_import_circle():
    graph, state, circles = import_graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []
