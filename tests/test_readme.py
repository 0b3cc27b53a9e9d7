"""README.md: short, its Python examples run, its commands parse, its links and names are real."""

import re
import shlex
from pathlib import Path

import pytest

import mixq
from mixq import cli, ptq, tasks
from mixq.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)


def table_names(first_header: str) -> list[str]:
    """The backquoted names in the first column of the README table whose header starts so."""
    lines = README.split(f"| {first_header} |", 1)[1].splitlines()[2:]
    rows = [ln for ln in lines[: next(i for i, ln in enumerate(lines) if not ln.startswith("|"))]]
    return [n for r in rows for n in re.findall(r"`([^`]+)`", r.split("|")[1])]


def test_short():
    assert len(README.splitlines()) <= 250


@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_python_examples_run(i, tmp_path, monkeypatch):
    """Each Python block runs as written (on its own tiny inputs) and its plan meets its budget."""
    monkeypatch.chdir(tmp_path)  # files an example writes land here
    ns: dict = {}
    exec(compile(blocks("python")[i], f"README.md python block {i}", "exec"), ns)
    res = ns["res"]
    assert isinstance(res, mixq.Result) and res.metrics.within and all(res.metrics.within.values())
    assert res.metrics.avg_weight_bits <= res.metrics.budget["avg_weight_bits"]


def test_python_examples_are_short():
    """Quantizing one's own model takes under ten lines besides the imports (a wrapped call is one)."""
    for code in blocks("python"):
        body = [ln for ln in code.splitlines() if ln and not ln.startswith(("import ", "from "))]
        statements = [ln for ln in body if not ln.startswith(" ")]
        assert len(statements) < 10, code


def commands() -> list[list[str]]:
    out = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("mixq ") and not line.startswith("mixq -"):  # subcommands (not --version)
                out.append(shlex.split(line.split("#", 1)[0])[1:])
    return out


@pytest.mark.parametrize("argv", commands(), ids=" ".join)
def test_cli_examples_parse(argv):
    """Each `mixq ...` line of the README is a valid command line (parsed, not run)."""
    args = cli.build_parser().parse_args(argv)
    assert args.cmd == argv[0]


def test_cli_examples_found():
    assert {a[0] for a in commands()} >= {"list", "run", "eval", "export", "report"}


def test_make_targets_and_bench_modules_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"make ([a-z][\w-]*)", README)):
        assert re.search(rf"^{target}:", makefile, re.M), f"make {target}"
    mods = set(re.findall(r"python -m bench\.(\w+)", README)) | set(
        re.findall(r"`(\w+)`", README.split("python -m bench.<name>` (")[1].split(")")[0])
    )
    for mod in mods:
        assert (ROOT / "bench" / f"{mod}.py").is_file(), f"bench.{mod}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    """Every relative link names a file of the repository, and its #anchor a heading of it."""
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert links
    for link in links:
        assert not link.startswith("http"), link
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), link
        if anchor:
            heads = re.findall(r"^#+ (.*)$", target.read_text(), re.M)
            assert anchor in {slug(h) for h in heads}, link


def test_tables_name_what_exists():
    """The methods and tasks tables list exactly the registered ones; the PTQ steps named exist."""
    assert sorted(table_names("method")) == sorted(METHODS)
    assert sorted(table_names("task")) == sorted(tasks.TASKS)
    for step in ptq.STEPS:
        assert f"`{step}`" in README
