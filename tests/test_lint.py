"""The linter's rules (pyproject.toml [tool.ruff]) hold over the whole repository: CI runs this."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff() -> str:
    """The ruff next to this Python (the project's venv: scripts/setup.sh installs it), else on PATH."""
    beside = Path(sys.executable).parent / "ruff"
    found = str(beside) if beside.exists() else shutil.which("ruff")
    assert found, "ruff is not installed: bash scripts/setup.sh installs the test extra, which has it"
    return found


def test_ruff_check_is_clean():
    out = subprocess.run([ruff(), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_function_in_fmn_is_longer_than_about_100_lines():
    import ast
    long = []
    for path in sorted((ROOT / "fmn").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser":
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def module_imports(path: Path, package_root: Path) -> set[str]:
    """Modules of this repository that `path` imports, at module level or inside functions (a lazy
    import closes a cycle too, only later)."""
    import ast
    name = ".".join(path.relative_to(package_root).with_suffix("").parts)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if name.endswith(".__init__"):
        package = name = name[: -len(".__init__")]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("fmn", "fmn_kernels") and m != name}


def test_no_import_cycle():
    paths = {}
    for top in ("fmn", "fmn_kernels"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            paths[name] = path
    graph = {m: {d for d in module_imports(p, ROOT) if d in paths} for m, p in paths.items()}
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, cycle
