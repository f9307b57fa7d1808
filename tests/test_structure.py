"""The package's shape: config imports no other module of the package, no module-level import
cycle in ursa/, scripts import no script, private names are not imported across modules."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "eval", "synth")


def module_imports(path: Path) -> set:
    """ursa.* modules imported at module level (not inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "ursa" or node.module.startswith("ursa.")):
            if node.module == "ursa":
                out |= {f"ursa.{a.name}" for a in node.names}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ursa.")}
    return out


def graph() -> dict:
    return {f"ursa.{p.stem}": module_imports(p) for p in sorted((ROOT / "ursa").glob("*.py")) if p.stem != "__init__"}


def test_config_imports_only_the_standard_library():
    code = "import sys, ursa.config; print(sorted(m for m in sys.modules if m.startswith('ursa')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['ursa', 'ursa.config']"


def test_no_import_cycle():
    g = graph()
    state: dict = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "active", "import cycle: " + " -> ".join(path + [m])
        state[m] = "active"
        for n in g.get(m, ()):
            visit(n, path + [m])
        state[m] = "done"

    for m in g:
        visit(m, [])


def test_scripts_import_no_script_and_no_private_names():
    for name in SCRIPTS + tuple(f"ursa/{p.stem}" for p in (ROOT / "ursa").glob("*.py")):
        path = ROOT / f"{name}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name in SCRIPTS for a in node.names), f"{path.name} imports a script"
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in SCRIPTS, f"{path.name} imports the script {node.module}"
                if node.module.startswith("ursa"):
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, f"{path.name} imports private names {private} from {node.module}"
