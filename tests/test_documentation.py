"""The documentation against the code: every `python <script>.py ...` command line in README.md's and
documentation/*.md's code blocks, the scripts' usage docstrings and the Makefile parses with that script's own flags
(nothing is run), and no document or source file points outside the repository."""
import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT

# The command lines the documents show, by how they are invoked: the module whose parse_args(argv) parses them.
SCRIPTS = {"train.py": "train", "test.py": "test", "predict.py": "predict", "preprocess_data.py": "preprocess_data",
           "locate_heart.py": "locate_heart", "convert_release.py": "convert_release",
           "benchmarks/myops2020.py": "benchmarks.myops2020", "benchmarks/nnunet_myops2020.py":
           "benchmarks.nnunet_myops2020", "benchmarks/speed.py": "benchmarks.speed",
           "benchmarks/check_release_conversion.py": "benchmarks.check_release_conversion",
           "benchmarks/gpu_speed_steps.py": "benchmarks.gpu_speed_steps"}
MODULES = {"priors.encode": "priors.encode", "datasets.phantom": "datasets.phantom"}
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "documentation").glob("*.md"))]
SCRIPT_FILES = [ROOT / name for name in SCRIPTS] + [ROOT / "priors" / "encode.py", ROOT / "datasets" / "phantom.py"]
OUTSIDE = "../shared"  # the workspace beside a checkout: a clone elsewhere has none


def code_blocks(path):
    """(first line number, text) of each fenced code block of a Markdown file."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if current is None:
                current, start = [], number + 1
            else:
                blocks.append((start, "\n".join(current)))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def docstring_block(path):
    """A script's usage lines (its module docstring, which --help prints) as one block."""
    text = path.read_text()
    match = re.match(r'\s*"""(.*?)"""', text, re.S)
    return [(1, match.group(1))] if match else []


def makefile_blocks():
    """The Makefile's recipes with its variables written out, and the directory variable as the demo sets it."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    variables = {name: value for name, value in re.findall(r"^([A-Z_]+) :?= *(.*)$", text, re.M)
                 if name not in ("PYTHON", "STAMP")}  # set per environment
    for _ in range(3):
        text = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), text)
        variables = {name: re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), value)
                     for name, value in variables.items()}
    return [(1, text.replace("$(PYTHON)", "python"))]


def logical_lines(block):
    """(offset, line) with backslash continuations joined, shell variables and loop variables written out."""
    variables, lines, pending, offset = {}, [], "", 0
    for index, line in enumerate(block.splitlines()):
        if not pending:
            offset = index
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((offset, pending + line))
        pending = ""
    resolved = []
    for offset, line in lines:
        assignment = re.match(r"^\s*([A-Za-z_]\w*)=(\S.*)$", line)
        if assignment:
            variables[assignment.group(1)] = " ".join(shlex.split(assignment.group(2), comments=True))
        for name, first in re.findall(r"\bfor (\w+) in (\S+)", line):
            variables[name] = first
        for name, value in variables.items():
            line = re.sub(rf"\$\{{?{name}\b\}}?", lambda _: value, line)
        resolved.append((offset, line))
    return resolved


def command_lines(block):
    """(offset, script or module, argv) of each python command in a block of shell lines."""
    found = []
    for offset, line in logical_lines(block):
        placeholders = {}

        def hide(match):
            placeholders[f"PLACEHOLDER{len(placeholders)}"] = match.group(0)
            return f"PLACEHOLDER{len(placeholders) - 1}"

        line = re.sub(r"<[^<>\n]*>", hide, line)  # <run>, <the same flags>: not redirections
        line = re.sub(r"\(([^()|]*)\|[^()]*\)", r"\1", line)  # a synopsis's (A | B): the first
        line = re.sub(r"\s\d*>&\d+", " ", line)  # 2>&1
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError:  # not shell (prose in a block)
            continue
        command = []
        for token in tokens + [";"]:
            if token not in (";", "&&", "||", "|", "&"):
                command.append(token)
                continue
            parsed = python_command(command, placeholders)
            if parsed:
                found.append((offset, *parsed))
            command = []
    return found


def python_command(tokens, placeholders):
    """(script or module, argv) when ``tokens`` run a documented script with Python, else None."""
    if not any(Path(token).name.startswith(("python", "torchrun")) for token in tokens):
        return None
    for index, token in enumerate(tokens):
        target = SCRIPTS.get(token) or (MODULES.get(tokens[index + 1]) if token == "-m" and index + 1 < len(tokens)
                                        else None)
        if target is None:
            continue
        arguments = tokens[index + (2 if token == "-m" else 1):]
        argv = []
        for argument in arguments:
            argument = argument.strip("[]")
            if argument in ("", "...", ">", ">>"):
                continue
            for key, text in placeholders.items():
                argument = argument.replace(key, text)
            if re.fullmatch(r"<[^>]*flags[^>]*>", argument):
                continue  # <the same flags>: a stand-in for flags, shown elsewhere
            argv.append(argument)
        return target, argv
    return None


def documented_commands():
    sources = [(path, block) for path in DOCUMENTS for block in code_blocks(path)]
    sources += [(path, block) for path in SCRIPT_FILES for block in docstring_block(path)]
    sources += [(ROOT / "Makefile", block) for block in makefile_blocks()]
    commands = []
    for path, (start, text) in sources:
        for offset, target, argv in command_lines(text):
            commands.append(pytest.param(target, argv, id=f"{path.relative_to(ROOT)}:{start + offset}"))
    return commands


COMMANDS = documented_commands()


def test_the_documents_show_commands_of_every_script():
    shown = {param.values[0] for param in COMMANDS}
    assert {"train", "test", "predict", "preprocess_data", "locate_heart", "convert_release", "priors.encode",
            "benchmarks.myops2020", "benchmarks.speed"} <= shown, f"the extraction found only {sorted(shown)}"


@pytest.mark.parametrize(("module_name", "argv"), COMMANDS)
def test_each_documented_command_parses_with_its_scripts_flags(module_name, argv, capsys):
    module = importlib.import_module(module_name)
    parse = module.parse_args
    if "--subsets_from" in argv:  # its parsing reads the complete run's checkpoint, which a document's example lacks
        parse = importlib.import_module("engine.training").training_parser().parse_args
    try:
        parse(argv)
    except SystemExit as exit_:
        if exit_.code:
            pytest.fail(f"{module_name} refuses {shlex.join(argv)}:\n{capsys.readouterr().err.strip()}")


class _Parser(Exception):
    """Carries the parser a script builds, caught before it parses anything."""


def script_options(module_name, monkeypatch):
    """Every option string a script accepts (its subcommands' too; test.py's include train.py's, which it ignores)."""
    def capture(parser, *args, **kwargs):
        raise _Parser(parser)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        try:
            importlib.import_module(module_name).parse_args([])
        except _Parser as caught:
            parsers = [caught.args[0]]
    if module_name == "test":
        from engine.training import training_parser
        parsers.append(training_parser())
    options = set()
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            options.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
    return options


def prose_flags():
    """(document, line, script, flags) of each inline code span that names a script with flags
    (`train.py --subsets_from RUN`), and of each flag table's first column (training.md: train.py, ...)."""
    tables = {"training.md": "train", "speed.md": "train", "data.md": "preprocess_data", "prediction.md": "predict"}
    found = []
    for path in DOCUMENTS:
        in_block = False
        table_script = None
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            if in_block:
                continue
            if line.startswith("| flag |"):
                table_script = tables.get(path.name)
            elif not line.startswith("|"):
                table_script = None
            elif table_script and not line.startswith("|---"):
                flags = re.findall(r"`(--\w+)", line.split("|")[1])
                found.append(pytest.param(table_script, flags, id=f"{path.relative_to(ROOT)}:{number}"))
            for span in re.findall(r"`([^`]+)`", line):
                words = span.split()
                module_name = SCRIPTS.get(words[0].removeprefix("python ")) if words else None
                flags = [word for word in words[1:] if word.startswith("--")]
                if module_name and flags:
                    found.append(pytest.param(module_name, flags, id=f"{path.relative_to(ROOT)}:{number}"))
    return found


@pytest.mark.parametrize(("module_name", "flags"), prose_flags())
def test_each_flag_the_prose_and_tables_name_is_one_of_the_scripts(module_name, flags, monkeypatch):
    unknown = sorted(set(flags) - script_options(module_name, monkeypatch))
    assert not unknown, f"{module_name} has no {', '.join(unknown)}"


def test_the_demos_training_flags_find_its_run_with_test_py():
    """make demo's train.py flags given to test.py: the train-only ones ignored (and named), the run folder found."""
    import test as test_script

    recipe = makefile_blocks()[0][1]
    flags = shlex.split(re.search(r"^\s*python train\.py (.*)$", recipe, re.M).group(1))
    args = test_script.parse_args(flags)
    assert args.run_dir == Path("demo_output/run")
    assert "--prior_encoder" in args.ignored_training_flags and "--vit_name" not in args.ignored_training_flags


def test_no_document_or_source_file_points_outside_the_repository():
    files = [ROOT / "README.md", *(ROOT / "documentation").rglob("*.md"), *ROOT.glob("*.py")]
    for package in ("engine", "networks", "datasets", "priors"):
        files += (ROOT / package).rglob("*.py")
    offending = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in files
                 for number, line in enumerate(path.read_text().splitlines(), 1) if OUTSIDE in line]
    assert not offending, "paths outside the repository (use a placeholder such as path/to/MyoPS2020):\n" + \
        "\n".join(offending)


def test_every_test_the_documents_name_exists():
    """reliability.md and the others back their guarantees with named tests: each must be there."""
    defined = {name for path in (ROOT / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    named = set()
    for path in DOCUMENTS:
        text = path.read_text()
        named.update(re.findall(r"`(test_\w+)`", text))
        for file_name, test_name in re.findall(r"`(tests/test_\w+\.py)(?:::(\w+))?`", text):
            assert (ROOT / file_name).is_file(), f"{path.name} names {file_name}, which does not exist"
            if test_name:
                named.add(test_name)
    assert named, "no test names found: the pattern no longer matches the documents"
    assert not named - defined, f"the documents name tests that do not exist: {sorted(named - defined)}"


def heading_anchors(path):
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def test_every_relative_link_of_the_documents_reaches_its_file_and_heading():
    broken = []
    for path in [*DOCUMENTS, ROOT / "benchmarks" / "results" / "RESULTS.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
