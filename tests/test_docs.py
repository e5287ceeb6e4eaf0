"""README.md and docs/*.md: relative links and #anchors resolve, Python blocks compile, the README stays short,
and no text points at tracker issues by number. The conventions are described in docs/testing.md."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "<!-- not run -->"  # on the line before a ```python fence (blank lines between allowed): not compiled
README_MAX_LINES = 220
# Pages another change is still writing: a link to one of these may point nowhere until it lands. Once the
# file exists its anchors are checked like any other page's; remove the entry then.
PENDING = set()

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
ISSUE = re.compile(r"\bissues?[ _]#?\d+|\(#\d+\)", re.I)


def rel(path: Path, root: Path = ROOT) -> str:
    return path.relative_to(root).as_posix()


def prose_lines(text: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def python_blocks(text: str):
    """(line number of the fence, code, marked not run) of every ```python block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*```(\w*)", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if FENCE.match(lines[j]))
        if m.group(1) == "python":
            before = [ln.strip() for ln in lines[:i] if ln.strip()]
            yield i + 1, "\n".join(lines[i + 1:end]) + "\n", bool(before) and before[-1] == NOT_RUN
        i = end + 1


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, lower case, everything but letters, digits,
    '_', '-' and spaces dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def links(path: Path):
    """(line number, target) of every relative link in the page's prose (inline code left out)."""
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                yield n, target


def broken_links(page: Path, root: Path = ROOT, pending=PENDING) -> list[str]:
    problems = []
    for n, target in links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = f"{rel(page, root)}:{n}: {target}"
        if not dest.is_relative_to(root):
            problems.append(f"{where}: outside the repository")
        elif not dest.exists():
            if rel(dest, root) not in pending:
                problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with that anchor in {rel(dest, root)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_link_check_catches_broken_links(tmp_path):
    """The check itself: a missing file, a missing anchor and a missing page are reported; good links, links
    in code and a pending page are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Page A\n\n## Some `code`: here, (too)\n\n## Some `code`: here, (too)\n")
    page = tmp_path / "docs" / "b.md"
    page.write_text("[ok](a.md#some-code-here-too) [ok2](a.md#some-code-here-too-1) [self](#b) [web](https://x.y/z)\n"
                    "# B\n```bash\n[not a link](nowhere.md)\n```\n"
                    "[gone](missing.md) [bad](a.md#nope) `[code](nowhere.md)` [later](later.md)\n")
    assert broken_links(page, tmp_path, {"docs/later.md"}) == [
        "docs/b.md:6: missing.md: no such file",
        "docs/b.md:6: a.md#nope: no heading with that anchor in docs/a.md"]


def test_pending_pages_are_still_linked():
    """An allow-list entry that nothing links to any more is stale."""
    targets = {rel((page.parent / t.partition("#")[0]).resolve()) for page in PAGES for _, t in links(page)
               if t.partition("#")[0]}
    assert PENDING <= targets


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_python_blocks_compile(page):
    for line, code, not_run in python_blocks(page.read_text(encoding="utf-8")):
        if not not_run:
            compile(code, f"{rel(page)}:{line}", "exec")


def test_kernel_signature_block_is_documentation_only():
    """docs/kernels.md shows cross_attention's signature (`*`): not code, so it is marked not run."""
    blocks = list(python_blocks((ROOT / "docs" / "kernels.md").read_text(encoding="utf-8")))
    line, code, not_run = next(b for b in blocks if "fmn_kernels.cross_attention(" in b[1])
    assert not_run
    with pytest.raises(SyntaxError):
        compile(code, "docs/kernels.md", "exec")


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; details belong in docs/"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_issue_numbers(page):
    lines = page.read_text(encoding="utf-8").splitlines()
    hits = [f"{rel(page)}:{n}: {line.strip()}" for n, line in enumerate(lines, 1) if ISSUE.search(line)]
    assert hits == []
