"""The code's layers (docs/layout.md): lmkit/ is the library under both models. It imports neither
model (gpt/, bigram/) nor a command (lmkit's *_cli.py modules, the top-level scripts), and no
module of the project imports itself back through others, not even from inside a function."""
import ast
import subprocess
import sys

from conftest import REPO_ROOT

SCRIPTS = ("prepare_data", "bench", "plot_runs")


def module_name(path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict:
    """Module name -> path for lmkit/, gpt/, bigram/ and the top-level scripts."""
    paths = [*(REPO_ROOT / "lmkit").glob("*.py"), *(REPO_ROOT / "gpt").glob("*.py"),
             *(REPO_ROOT / "bigram").glob("*.py"), *(REPO_ROOT / f"{s}.py" for s in SCRIPTS)]
    return {module_name(path): path for path in paths}


def imports(path, modules) -> set:
    """The project modules a file imports anywhere in it, inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from lmkit import device` imports the module lmkit.device
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def is_command(name: str) -> bool:
    return name.endswith("_cli") or name in SCRIPTS


def test_the_library_imports_no_model_and_no_command():
    modules = project_modules()
    library = [name for name in modules if name.startswith("lmkit.") and not is_command(name)]
    wrong = {name: sorted(m for m in imports(modules[name], modules)
                          if m.split(".")[0] in ("gpt", "bigram") or is_command(m))
             for name in library}
    assert {name: found for name, found in wrong.items() if found} == {}
    # and, in a fresh process, importing all of it loads none of them (dynamic imports included)
    code = ("import sys\n" + "".join(f"import {name}\n" for name in library) +
            "print(' '.join(n for n in sys.modules if n.split('.')[0] in ('gpt', 'bigram', "
            f"*{SCRIPTS!r}) or n.endswith('_cli')))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []


def test_no_import_circles():
    modules = project_modules()
    graph = {name: imports(path, modules) - {name} for name, path in modules.items()}
    done, on_path = set(), []

    def visit(name):
        if name in on_path:
            raise AssertionError("import circle: " + " -> ".join(on_path[on_path.index(name):]
                                                                  + [name]))
        if name in done:
            return
        on_path.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
