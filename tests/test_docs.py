"""The manual holds together: the README stays short, every file and section that code and docs cite exists
inside the repository, and no paragraph is said twice."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
# Cited files: a path into one of the project's folders, or one of the top-level Markdown files.
FOLDERS = ("pipeline", "train", "evaluate", "ifvit", "benchmarks", "tests", "docs", "shards")
PATH = re.compile(rf"(?<![\w/.-])((?:{'|'.join(FOLDERS)})/[\w/.-]*\w\.(?:py|md|json)|README\.md|CONTRACTS\.md)")
# ... optionally with a section: FILE §N (a numbered heading), FILE, "Heading", or FILE#anchor.
SECTION = re.compile(r'\s*(?:§\s*(\d+)|,\s*"([^"]+)"|#([\w-]+))')
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"(?<![A-Za-z])(?!README|CONTRACTS)[A-Z]{3,}")  # runs/NAME/..., MACHINE-DATE.json: patterns


def tracked(*suffixes: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / p for p in out if p.endswith(suffixes) and (ROOT / p).is_file()]


def headings(md: Path) -> list[str]:
    text, out, fenced = md.read_text(encoding="utf-8"), [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*)", line)):
            out.append(m.group(1).strip())
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def resolve(name: str, source: Path) -> Path | None:
    """A cited file: relative to the citing Markdown file, else to the repository (CONTRACTS.md is in docs/)."""
    for base in ([source.parent] if source.suffix == ".md" else []) + [ROOT, ROOT / "docs"]:
        if (base / name).exists():
            return base / name
    return None


def section_problem(target: Path, number: str | None, title: str | None, anchor: str | None) -> str | None:
    if target.suffix != ".md" or not (number or title or anchor):
        return None
    found = headings(target)
    if number and not any(re.match(rf"{number}\.\s", h) for h in found):
        return f"no section {number}. in {target.name}"
    if title and title.lower() not in {h.replace("`", "").lower() for h in found}:
        return f'no section "{title}" in {target.name}'
    if anchor and anchor not in {slug(h) for h in found}:
        return f"no heading with anchor #{anchor} in {target.name}"
    return None


def test_readme_is_a_short_manual():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move detail into docs/"


def test_nothing_cites_files_outside_the_repository():
    outside = ["DESIGN" + ".md", "paper" + ".txt", "../" + "shared"]  # spelled apart: this file cites none
    found = [f"{p.relative_to(ROOT)}: {word}" for p in tracked(".py", ".md", "Makefile", ".toml")
             for word in outside if word in p.read_text(encoding="utf-8")]
    assert not found, found


def test_every_cited_file_and_section_exists():
    problems = []
    for source in tracked(".py", ".md"):
        text = source.read_text(encoding="utf-8")
        where = source.relative_to(ROOT)
        for m in PATH.finditer(text):
            if PLACEHOLDER.search(m.group(1)):
                continue
            target = resolve(m.group(1), source)
            if target is None:
                problems.append(f"{where}: cites {m.group(1)}, which is not in the repository")
                continue
            section = SECTION.match(text, m.end())
            if section and (problem := section_problem(target, *section.groups())):
                problems.append(f"{where}: {m.group(1)}: {problem}")
        if source.suffix != ".md":
            continue
        for m in LINK.finditer(text):
            link = m.group(1)
            if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
                continue
            name, _, anchor = link.partition("#")
            target = (source.parent / name) if name else source
            if not target.exists():
                problems.append(f"{where}: links to {link}, which is not in the repository")
            elif anchor and (problem := section_problem(target, None, None, anchor)):
                problems.append(f"{where}: link {link}: {problem}")
    assert not problems, "\n".join(problems)


def paragraphs(md: Path) -> list[str]:
    """Prose paragraphs: no code blocks, tables or headings, whitespace normalised."""
    out, current, fenced = [], [], False
    for line in md.read_text(encoding="utf-8").splitlines() + [""]:
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith(("|", "#", "<!--")):
            continue
        if line.strip():
            current.append(line.strip())
        elif current:
            out.append(" ".join(current))
            current = []
    return out


def test_no_paragraph_is_said_twice():
    seen, repeats = {}, []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "shards" / "README.md"]:
        for para in paragraphs(md):
            if len(para) < 100:
                continue
            if para in seen:
                repeats.append(f"{md.relative_to(ROOT)} repeats {seen[para]}: {para[:80]}...")
            seen.setdefault(para, md.relative_to(ROOT))
    assert not repeats, "\n".join(repeats)


def test_readme_demo_block_is_generated_from_the_committed_results():
    from evaluate.report import DEMO_RESULTS, demo_block

    assert (DEMO_RESULTS / "grid.png").is_file()
    assert demo_block() in (ROOT / "README.md").read_text(encoding="utf-8"), \
        "regenerate it: python -m evaluate.report --readme-block docs/results/demo"
