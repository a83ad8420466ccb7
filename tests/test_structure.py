"""The package's shape, as STYLE.md asks it: no import cycles between nanoseek's modules; imports of nanoseek modules
at module top (only the CLI imports its subcommands lazily); no trainer imports another trainer, and evaluation and
distillation import none; the engine never reaches inside the model's blocks (the model owns its cached forward)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "nanoseek"
TRAINERS = {"nanoseek.train.pretrain", "nanoseek.train.sft", "nanoseek.train.rl", "nanoseek.train.distill"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p) for p in ROOT.rglob("*.py")}


def imports(path: Path) -> tuple[set[str], list[int]]:
    """nanoseek modules imported at module top, and the lines of nanoseek imports inside functions. `from P import
    m` counts as importing the module P.m when that is a module, else P."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanoseek"):
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("nanoseek")]
        if not names:
            continue
        if node in tree.body:
            top.update(names)
        else:
            nested.append(node.lineno)
    return top, nested


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    g = {}
    for name, p in files.items():
        top, _ = imports(p)
        g[name] = {m for m in top if m in files and m != name}
    return g


def test_no_import_cycles():
    g = graph()
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for m in g[n]:
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = "done"
    for n in g:
        if n not in state:
            visit(n, [n])


def test_imports_at_module_top():
    for p in ROOT.rglob("*.py"):
        if p.name == "cli.py":
            continue
        _, nested = imports(p)
        assert not nested, f"{p.relative_to(ROOT.parent)}: nanoseek imported inside a function at lines {nested}"


def test_trainers_stay_apart():
    g = graph()
    for t in TRAINERS | {"nanoseek.evaluate"}:
        assert not g[t] & TRAINERS, f"{t} imports {sorted(g[t] & TRAINERS)}"


def test_engine_uses_the_models_own_forward():
    src = (ROOT / "engine.py").read_text()
    for inside in ("self_attn", ".mlp", "input_layernorm", "post_attention_layernorm", "eh_proj", ".layers"):
        assert inside not in src, f"engine.py reaches into the model: {inside}"
