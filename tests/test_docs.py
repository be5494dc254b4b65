"""The project's Markdown pages link only files that exist in the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(p for p in ROOT.rglob("*.md") if not any(part.startswith(".") or part in {"node_modules", "build"}
                                                          for part in p.relative_to(ROOT).parts))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    """Link targets of a Markdown page that are neither URLs nor in-page anchors, without their #fragment."""
    targets = (match.group(1) for match in LINK.finditer(page.read_text(encoding="utf-8")))
    return [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_resolve_inside_the_repository(page):
    missing = []
    for target in relative_links(page):
        resolved = (page.parent / target).resolve()
        if not resolved.exists() or ROOT not in resolved.parents and resolved != ROOT:
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links files that are not in the repository: {missing}"


def test_the_readme_links_the_projects_own_algorithm_page():
    assert "pruner_core/ALGORITHM.md" in relative_links(ROOT / "README.md")
