"""The package layout is the architecture: data flows training -> registry -> serving, and each capability
package imports only what lies below it. Every import in mlray/ (top-level and inside functions) is read
with ``ast``; an import that goes the wrong way fails here with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MLRAY = ROOT / "mlray"

# package under mlray/ -> mlray packages it must never import
FORBIDDEN = {
    "training": ("serving", "cli", "pipeline", "compress"),
    "serving": ("training", "cli", "pipeline", "cluster"),
    "registry": ("training", "serving", "cli", "pipeline", "compress", "cluster"),
    "compress": ("serving", "cli", "pipeline"),
    "pipeline": ("cli",),
    "cluster": ("cli",),
    "_ray": ("training", "serving", "registry", "cli", "pipeline", "compress", "cluster"),
}
ENTRYPOINTS = ("serve_apps", "jobs")  # thin entrypoints call the library, never the other way round


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from mlray import cluster` names a package as well
            if node.module == "mlray":
                found += [(node.lineno, f"mlray.{alias.name}") for alias in node.names]
    return found


def offences(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((MLRAY / package).rglob("*.py")):
        for line, module in imported_modules(path):
            parts = module.split(".")
            if parts[0] in ENTRYPOINTS or (parts[0] == "mlray" and len(parts) > 1 and parts[1] in forbidden):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


def test_no_capability_package_imports_one_above_it():
    bad = [offence for package, forbidden in FORBIDDEN.items() for offence in offences(package, forbidden)]
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_its_entrypoints():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in sorted(MLRAY.rglob("*.py"))
           for line, module in imported_modules(path) if module.split(".")[0] in ENTRYPOINTS]
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_the_cli():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in sorted(MLRAY.rglob("*.py"))
           if MLRAY / "cli" not in path.parents
           for line, module in imported_modules(path) if module == "mlray.cli" or module.startswith("mlray.cli.")]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_wrong_way_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from mlray.training.train import train\n    from mlray import serving\n")
    assert (2, "mlray.training.train") in imported_modules(module)
    assert (3, "mlray.serving") in imported_modules(module)


def test_the_default_serve_yaml_is_the_librarys_and_serve_apps_links_to_it():
    from mlray.serving.deploy import default_yaml, load_plan

    assert default_yaml().parent == MLRAY / "serving"
    assert (ROOT / "serve_apps" / "digits.yaml").resolve() == default_yaml().resolve()
    plan = load_plan()
    assert (plan.app_name, plan.args["model"], plan.host) == ("digits", "digits", "127.0.0.1")
