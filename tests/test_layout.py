"""The package layout holds: the library (everything but dqar.harness and dqar.cli) never imports the
harness or the CLI, and no module grows past the size a reader can hold."""
import ast
import subprocess
import sys
from pathlib import Path

import dqar

PACKAGE = Path(dqar.__file__).resolve().parent
HARNESS = ("dqar.harness", "dqar.cli")
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement anywhere in the file names (function bodies included)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base)
                name = f"{prefix}.{node.module}" if node.module else prefix
            else:
                name = node.module
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def library_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        if not module_name(path).startswith(HARNESS):
            yield path


def test_the_walk_sees_relative_and_function_level_imports(tmp_path):
    # The checker itself: it must resolve `from ..harness import x` inside a function in dqar/method/.
    fake = PACKAGE / "method" / "_layout_probe.py"
    try:
        fake.write_text("def f():\n    from ..harness import sweep\n", encoding="utf-8")
        assert "dqar.harness.sweep" in imported_modules(fake)
    finally:
        fake.unlink()


def test_library_modules_never_import_the_harness_or_the_cli():
    offenders = {}
    for path in library_files():
        bad = sorted(m for m in imported_modules(path) if m.startswith(HARNESS))
        if bad:
            offenders[module_name(path)] = bad
    assert not offenders, f"library modules import the harness/CLI: {offenders}"
    # The dqar.__init__ lazy table must not point into the harness either.
    assert not any(target.startswith(HARNESS) for target in dqar._LAZY.values())


def test_importing_the_library_loads_no_harness_module():
    code = ("import sys, dqar; from dqar import DQARConfig, apply_dqar, sample; import dqar.method.hooks, "
            "dqar.digits.embedded, dqar.models.hub, dqar.sampling; "
            "print(sorted(m for m in sys.modules if m.startswith(('dqar.harness', 'dqar.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) >= MAX_LINES}
    assert not long, f"modules at or over {MAX_LINES} lines: {long}"
