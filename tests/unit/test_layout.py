"""The package's layout: no import cycles, and the test bed stays out of the product.

The import graph is read from the source with `ast` (nothing is imported): every `import`
and `from ... import` of a meshbpf module, relative or absolute, at module level or inside a
function, is an edge to the deepest meshbpf module (file or package) it names.
"""

import ast
import os


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT_PACKAGE = "meshbpf"

# Who may import the test bed: itself, the demo and the benchmark (and the tests, which are
# not part of the package).
TESTBED = "meshbpf.testbed"
TESTBED_USERS = ("meshbpf.testbed", "meshbpf.demo", "meshbpf.bench")


def _modules(root_dir, package):
    """{dotted module name: path} for every .py file of `package` under `root_dir`."""
    found = {}
    base = os.path.join(root_dir, package)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        rel = os.path.relpath(dirpath, root_dir).split(os.sep)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            parts = rel if fn == "__init__.py" else rel + [fn[:-3]]
            found[".".join(parts)] = os.path.join(dirpath, fn)
    return found


def _deepest(name, modules):
    """The longest prefix of dotted `name` that is one of `modules`, or None."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def import_graph(root_dir=REPO, package=ROOT_PACKAGE):
    """{module: {module it imports: first line number}} within `package`."""
    modules = _modules(root_dir, package)
    graph = {}
    for mod, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_pkg = os.path.basename(path) == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        edges = graph.setdefault(mod, {})
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    up = here[:len(here) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from pkg import name`: the submodule pkg.name when it is one, else pkg
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t != package and not t.startswith(package + "."):
                    continue
                dest = _deepest(t, modules)
                if dest and dest != mod:
                    edges.setdefault(dest, node.lineno)
    return graph


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan), each as a
    sorted list, plus one concrete cycle through it for the message."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(comp, _one_cycle(graph, comp)) for comp in sorted(comps)]


def _one_cycle(graph, comp):
    """A path a -> ... -> a inside `comp`; "(line n)" is where the module on its left
    imports the next one."""
    members = set(comp)
    start = comp[0]
    prev, todo = {start: None}, [start]
    while todo:                                     # breadth first: a shortest cycle
        v = todo.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                path = path[::-1] + [start]
                return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(path, path[1:])) \
                    + f" -> {start}"
            if w in members and w not in prev:
                prev[w] = v
                todo.append(w)
    return " -> ".join(comp)


def _report(found):
    return "\n".join(f"  {', '.join(comp)}\n    e.g. {path}" for comp, path in found)


# -- the checker itself, on made-up packages ---------------------------------------------

def _tree(tmp_path, files):
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(tmp_path)


def test_checker_finds_relative_absolute_and_function_level_cycles(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",                      # relative, names a module
        "pkg/b.py": "def f():\n    import pkg.sub.c\n",        # absolute, inside a function
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import x\n",                 # two levels up, names an attribute
        "pkg/d.py": "import os\nfrom pkg import a\n",          # into the cycle, not part of it
    })
    g = import_graph(root, "pkg")
    assert g["pkg.a"] == {"pkg.b": 1}
    assert g["pkg.b"] == {"pkg.sub.c": 2}
    assert g["pkg.sub.c"] == {"pkg.a": 1}
    assert g["pkg.d"] == {"pkg.a": 2}
    ((comp, path),) = cycles(g)
    assert comp == ["pkg.a", "pkg.b", "pkg.sub.c"]
    assert path.startswith("pkg.a (line 1) -> pkg.b (line 2) -> pkg.sub.c (line 1)")


def test_checker_sees_no_cycle_in_a_package_importing_its_own_submodules(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "from .a import A\nfrom .b import B\n",
        "pkg/a.py": "from .b import B\nA = 1\n",
        "pkg/b.py": "import json\nfrom os import path\nB = 2\n",   # outside pkg: no edge
    })
    g = import_graph(root, "pkg")
    assert g == {"pkg": {"pkg.a": 1, "pkg.b": 2}, "pkg.a": {"pkg.b": 1}, "pkg.b": {}}
    assert cycles(g) == []


# -- meshbpf -----------------------------------------------------------------------------

def test_the_graph_covers_the_package():
    g = import_graph()
    assert {"meshbpf.cli", "meshbpf.testbed.node", "meshbpf.ebpf.interceptor"} <= set(g)
    assert "meshbpf.testbed.pods" in g["meshbpf.testbed.node"]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles in meshbpf:\n" + _report(found)


def test_only_the_tests_demo_and_bench_import_the_testbed():
    bad = [f"{mod} line {line}" for mod, edges in sorted(import_graph().items())
           for dest, line in edges.items()
           if (dest == TESTBED or dest.startswith(TESTBED + "."))
           and not any(mod == u or mod.startswith(u + ".") for u in TESTBED_USERS)]
    assert not bad, "product modules import the test bed: " + ", ".join(bad)


def test_the_old_test_bed_modules_are_gone():
    for old in ("sandbox.py", "sidecar.py"):
        assert not os.path.exists(os.path.join(REPO, ROOT_PACKAGE, old)), old
