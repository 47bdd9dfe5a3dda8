"""The documentation stays true to the repository (no containers needed).

- docs/variables.md is exactly what scripts/gen_variables_doc.py renders from the roles;
- every relative link in README.md and docs/*.md points to a file that exists (and, for a
  link to a heading, to a heading that exists);
- README.md stays a front page: at most 160 lines;
- every script the README or docs show as a command in a ```sh block (scripts/*.sh,
  bench/run.sh, any relative path/to/x.sh or .py at the start of a command) is executable
  in git (mode 100755), so that it runs from a fresh clone;
- the bad-input table of docs/tests.md lists every case of tests/static/test_bad_input.py.
"""

import importlib.util
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("roles/*/README.md"))]
README_MAX_LINES = 160


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel(path):
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------ variables.md ---
GENERATOR = load("gen_variables_doc", ROOT / "scripts" / "gen_variables_doc.py")


@pytest.mark.parametrize("path", sorted(GENERATOR.outputs()), ids=rel)
def test_variables_doc_and_role_readmes_are_generated_from_the_roles(path):
    expected = GENERATOR.outputs()[path]
    current = path.read_text() if path.exists() else ""
    assert current == expected, (
        f"{rel(path)} differs from the roles' argument specs, defaults and metas: "
        "run scripts/gen_variables_doc.py and commit the result")


# ------------------------------------------------------------------------ links ---
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def prose_lines(path):
    """The lines of a markdown file outside fenced code blocks, with inline code removed."""
    inside = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line.lstrip()):
            inside = not inside
            continue
        if not inside:
            yield number, re.sub(r"`[^`]*`", "", line)


def anchors(path):
    """GitHub's anchors for the headings of a markdown file."""
    found, seen, inside = set(), {}, False
    for line in path.read_text().splitlines():
        if FENCE.match(line.lstrip()):
            inside = not inside
            continue
        match = None if inside else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links():
    for doc in DOCS:
        for number, line in prose_lines(doc):
            for match in LINK.finditer(line):
                target = match.group(1)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                yield doc, number, target


@pytest.mark.parametrize("doc,number,target",
                         [pytest.param(d, n, t, id=f"{rel(d)}:{n}:{t}") for d, n, t in links()])
def test_relative_link_points_to_an_existing_file(doc, number, target):
    path_part, _, fragment = target.partition("#")
    destination = (doc.parent / path_part).resolve() if path_part else doc
    assert destination.exists(), f"{rel(doc)}:{number}: {target} does not exist"
    if fragment and destination.suffix == ".md":
        assert fragment in anchors(destination), (
            f"{rel(doc)}:{number}: {target}: no heading with the anchor #{fragment} in {rel(destination)}")


def test_every_document_has_links_checked():
    """The link test sees the README's links (a broken parser would pass vacuously)."""
    assert any(doc.name == "README.md" for doc, _, _ in links())


# ------------------------------------------------------------------------ README ---
def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the details to docs/")


# ------------------------------------------------------------ the executable bit ---
SHELL_BLOCK = re.compile(r"^```(sh|bash|shell|console)\s*$")
SCRIPT = re.compile(r"^(\./)?[\w.-]+(/[\w.-]+)*\.(sh|py)$|^(scripts|bench)/[\w.-]+$")


def first_words(line):
    """The first word of each command on a shell line (after ;, &&, ||, |, env assignments, sudo)."""
    lexer = shlex.shlex(line.removeprefix("$ "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: take the line's first word only
        tokens = line.split()[:1]
    starts, at_start = [], True
    for token in tokens:
        if token and set(token) <= set(";&|()"):
            at_start = True
        elif at_start and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", token) or token in ("sudo", "exec", "time")):
            continue
        elif at_start:
            starts.append(token)
            at_start = False
    return starts


def commands_in_shell_blocks():
    """(doc, line number, script) for each relative script run directly in a ```sh block."""
    for doc in DOCS:
        inside = continued = False
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            stripped = line.strip()
            if not inside:
                inside = bool(SHELL_BLOCK.match(stripped))
                continue
            if stripped.startswith("```"):
                inside = False
                continue
            words = [] if continued else first_words(stripped)
            continued = stripped.endswith("\\")
            for word in words:
                if not word.startswith("/") and SCRIPT.match(word):
                    yield doc, number, word.removeprefix("./")


def git_mode(path):
    out = subprocess.run(["git", "ls-files", "-s", "--", path], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] if out else None


SCRIPTS = sorted({(rel(d), n, s) for d, n, s in commands_in_shell_blocks()})


def test_the_documentation_runs_scripts():
    """The parser finds the README's two commands (it would pass vacuously otherwise)."""
    found = {script for _, _, script in SCRIPTS}
    assert {"scripts/sandbox.sh", "scripts/test.sh"} <= found, found


@pytest.mark.parametrize("doc,number,script", [pytest.param(*s, id=f"{s[0]}:{s[1]}:{s[2]}") for s in SCRIPTS])
def test_a_script_shown_as_a_command_is_executable_in_git(doc, number, script):
    path = ROOT / script
    assert path.is_file(), f"{doc}:{number}: {script} does not exist"
    try:
        mode = git_mode(script)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    if mode is None:
        # Not in git yet: `git add` will record the working tree's executable bit.
        assert os.access(path, os.X_OK), f"{doc}:{number}: {script} is not executable (chmod +x, then git add)"
    else:
        assert mode == "100755", (
            f"{doc}:{number}: {script} is {mode} in git, so a fresh clone cannot run it: "
            f"git update-index --chmod=+x {script}")


# ------------------------------------------------------------- bad-input table ---
def test_the_bad_input_table_lists_every_case():
    cases = load("test_bad_input_cases", ROOT / "tests" / "static" / "test_bad_input.py")
    text = (ROOT / "docs" / "tests.md").read_text()
    rows = set(re.findall(r"^\| ([^|`]+?) \|", text, re.M))
    names = set(cases.CASES) | set(cases.CLUSTER_CASES) | set(cases.DRILL_CASES)
    missing = sorted(names - rows)
    assert not missing, f"docs/tests.md has no row for the bad-input cases {missing}"
