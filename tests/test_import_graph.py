"""The import graph of fastcenter/ and kernels/, read from the source (every import statement, those inside
functions included), holds the package's dependency direction:

* no cycle anywhere: a module never reaches itself through imports, whether at the top of a file or hidden in a
  function body (a function-local import delays a cycle to call time, it does not remove it);
* kernels/ (installed as fastcenter.kernels) imports only torch, triton, the standard library and itself;
* fastcenter/reference.py, the eager specification of every op, imports nothing of ours.

The lazy import of fastcenter.kernels inside fastcenter/ops (so `import fastcenter` works without Triton) is an
ordinary edge of this graph: it is not a cycle, since the kernels import nothing of fastcenter.
"""

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Module name prefix -> folder: kernels/ is the subpackage fastcenter.kernels (pyproject's package-dir).
FOLDERS = {"fastcenter": ROOT / "fastcenter", "fastcenter.kernels": ROOT / "kernels"}
KERNEL_DEPENDENCIES = {"torch", "triton", "__future__"} | set(sys.stdlib_module_names)


def _modules() -> dict[str, pathlib.Path]:
    """{dotted module name: source file} of every module of ours."""
    found = {}
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """Every module `name` imports, anywhere in its source: our modules by their full names (`from . import x`
    names the submodule x when there is one), others by the name imported."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES else base)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _ours(target: str) -> bool:
    return target in MODULES or target.split(".")[0] in ("fastcenter", "kernels")


def _cycles() -> list[list[str]]:
    """One cycle per strongly connected component of our modules that has one (Tarjan's algorithm)."""
    edges = {name: sorted(t for t in targets if t in MODULES) for name, targets in GRAPH.items()}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def test_the_graph_sees_function_local_imports():
    """The lazy kernel imports of fastcenter/ops sit inside functions: the graph must hold them."""
    assert "fastcenter.kernels.norm" in GRAPH["fastcenter.ops.norm"]
    assert "fastcenter.kernels._device" in GRAPH["fastcenter.kernels.norm"]


def test_no_import_cycle():
    assert _cycles() == [], "modules that import each other (directly, or through others, or inside functions)"


def test_kernels_import_only_torch_triton_and_the_standard_library():
    for name, targets in GRAPH.items():
        if not name.startswith("fastcenter.kernels"):
            continue
        for target in targets:
            inside = target == "fastcenter.kernels" or target.startswith("fastcenter.kernels.")
            assert inside or target.split(".")[0] in KERNEL_DEPENDENCIES, f"{MODULES[name]} imports {target}"


def test_reference_imports_nothing_of_ours():
    ours = sorted(t for t in GRAPH["fastcenter.reference"] if _ours(t))
    assert ours == [], f"fastcenter/reference.py imports {ours}"
