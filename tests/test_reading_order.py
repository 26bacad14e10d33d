"""notebook.py reads top to bottom: every module-level name a top-level function or class uses is
defined above it (or is a builtin or an import). Names bound inside the function itself (arguments,
assignments, loops, imports, nested definitions) are its own and do not count; annotations are
never evaluated (`from __future__ import annotations`)."""
import ast

from conftest import ROOT

# (function or class, name it uses, why that is fine). Empty: nothing is used before it is defined.
EXCEPTIONS: set[tuple[str, str]] = set()


def module_definitions(tree: ast.Module) -> dict[str, int]:
    where: dict[str, int] = {}
    for node in tree.body:
        names: list[str] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [(a.asname or a.name).split(".")[0] for a in node.names]
        for name in names:
            where.setdefault(name, node.lineno)
    return where


def annotation_nodes(node: ast.AST) -> set[int]:
    out: set[int] = set()
    for n in ast.walk(node):
        parts = []
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            parts = [n.returns] + [a.annotation for a in ast.walk(n.args) if isinstance(a, ast.arg)]
        elif isinstance(n, ast.AnnAssign):
            parts = [n.annotation]
        for part in parts:
            if part is not None:
                out |= {id(m) for m in ast.walk(part)}
    return out


def locally_bound(node: ast.AST) -> set[str]:
    bound: set[str] = set()
    declared_global: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Global):
            declared_global |= set(n.names)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            bound.add(n.id)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n is not node:
            bound.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in n.names}
    return bound - declared_global


def uses_before_definition(source: str) -> list[tuple[str, str, int, int]]:
    tree = ast.parse(source)
    defined = module_definitions(tree)
    found = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        skip, own = annotation_nodes(node), locally_bound(node)
        for n in ast.walk(node):
            if (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and id(n) not in skip
                    and n.id not in own and defined.get(n.id, 0) > node.lineno):
                found.append((node.name, n.id, node.lineno, defined[n.id]))
    return sorted(set(found), key=lambda f: f[2])


def test_the_checker_catches_a_forward_use():
    src = "def a():\n    return B\n\n\ndef c(B=1):\n    return B\n\n\nB = 2\n"
    assert [(f, n) for f, n, *_ in uses_before_definition(src)] == [("a", "B")]


def test_no_module_level_name_is_used_above_its_definition():
    found = [f for f in uses_before_definition((ROOT / "notebook.py").read_text()) if f[:2] not in EXCEPTIONS]
    assert not found, "used above its definition (user, name, line of user, line of definition):\n" + \
        "\n".join(map(str, found))
