"""The layering of the code: a library under thin scripts (README's Layout, issue 16).

Read with ``ast``, nothing imported: every import of every module, at any depth, except inside an
``if __name__ == "__main__":`` block (a command line's entry, not a dependency of the module).
"""
import ast

import pytest

from conftest import ROOT

SCRIPTS = {"train", "test", "predict", "preprocess_data", "locate_heart", "convert_release"}
# The benchmarks' command lines (benchmarks/*.py; they find the root by a path insertion) over their library,
# benchmarks/harness/.
BENCHMARK_SCRIPTS = {"myops2020", "nnunet_myops2020", "speed", "gpu_speed_table", "check_release_conversion",
                     "gpu_speed_steps"}
PACKAGES_BELOW_THE_ENGINE = ("networks", "datasets", "priors")  # the model, the data, the text priors
ABOVE_THEM = SCRIPTS | {"trainer", "subset_trainer", "engine", "benchmarks"}


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_main_guard(node):
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imported_modules(path):
    """The top-level names of the modules ``path`` imports (relative imports resolved to their package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")[0] if path.is_relative_to(ROOT) else path.stem
    found = set()

    def visit(node):
        if is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def library_files():
    files = [ROOT / "trainer.py", ROOT / "subset_trainer.py", ROOT / "utils.py"]
    for package in ("engine",) + PACKAGES_BELOW_THE_ENGINE:
        files += sorted((ROOT / package).rglob("*.py"))
    return files + sorted((ROOT / "benchmarks" / "harness").rglob("*.py"))


def imported_names(path):
    """Every module ``path`` imports, as written (``benchmarks.speed``, ``speed``, ``torch.nn``), outside an
    ``if __name__ == "__main__":`` block."""
    found = set()

    def visit(node):
        if is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def imports_a_benchmark_script(path):
    return any(name in BENCHMARK_SCRIPTS or (name.startswith("benchmarks.") and name.split(".")[1] in BENCHMARK_SCRIPTS)
               for name in imported_names(path))


def test_the_scripts_are_the_ones_at_the_root():
    entry_points = {path.stem for path in ROOT.glob("*.py") if 'if __name__ == "__main__":' in path.read_text()}
    assert entry_points == SCRIPTS, "a new script at the root belongs in SCRIPTS (or its code in the library)"


@pytest.mark.parametrize("path", library_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_library_module_imports_a_script(path):
    assert not imported_modules(path) & SCRIPTS
    assert not imports_a_benchmark_script(path)


def test_the_benchmark_scripts_are_the_ones_named():
    entry_points = {path.stem for path in (ROOT / "benchmarks").glob("*.py")}
    assert entry_points == BENCHMARK_SCRIPTS, "a new benchmark script belongs in BENCHMARK_SCRIPTS"


@pytest.mark.parametrize("name", sorted(BENCHMARK_SCRIPTS))
def test_no_benchmark_script_imports_a_script(name):
    path = ROOT / "benchmarks" / f"{name}.py"
    assert not imported_modules(path) & SCRIPTS
    assert not any(other in imported_names(path) or f"benchmarks.{other}" in imported_names(path)
                   for other in BENCHMARK_SCRIPTS - {name})


@pytest.mark.parametrize("path", sorted(ROOT / f"{name}.py" for name in SCRIPTS), ids=lambda path: path.name)
def test_no_script_imports_another_script(path):
    assert not imported_modules(path) & (SCRIPTS - {path.stem})


@pytest.mark.parametrize("path", [path for path in library_files() if module_name(path).startswith(
    PACKAGES_BELOW_THE_ENGINE)], ids=lambda path: str(path.relative_to(ROOT)))
def test_the_model_data_and_prior_packages_import_nothing_above_them(path):
    assert not imported_modules(path) & ABOVE_THEM


@pytest.mark.parametrize("path", sorted((ROOT / "engine").glob("*.py")), ids=lambda path: path.name)
def test_the_engine_does_not_import_the_training_loop(path):
    assert not {"trainer", "subset_trainer"} & imported_modules(path)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    import train\n\nif __name__ == '__main__':\n    import predict\n")
    assert imported_modules(module) == {"train"}


def test_the_walk_names_benchmark_scripts_however_imported(tmp_path):
    for line in ("from speed import import_reference", "from benchmarks import myops2020", "import benchmarks.speed"):
        module = tmp_path / "probe.py"
        module.write_text(line + "\n")
        assert imports_a_benchmark_script(module), line
    module.write_text("from benchmarks.harness.records import read_results\n")
    assert not imports_a_benchmark_script(module)
