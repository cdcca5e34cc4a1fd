"""Every page of the docs can be found: from the README's Documentation section, and in the
site's navigation."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"


def _readme_documentation_links() -> set[str]:
    """The local targets the README's Documentation section links to."""
    section = re.search(r"^## Documentation\n(.*?)^## ", (ROOT / "README.md").read_text(),
                        re.S | re.M)
    assert section is not None
    return set(re.findall(r"\]\(([^)#\s]+)", section.group(1)))


def _nav_pages() -> set[str]:
    """The pages of mkdocs.yml's nav, relative to docs/."""
    nav = re.search(r"^nav:\n((?:[ -].*\n?)*)", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert nav is not None
    return set(re.findall(r":\s*(\S+\.md)\s*$", nav.group(1), re.M))


def test_the_readme_links_every_docs_page() -> None:
    links = _readme_documentation_links()
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert sorted(pages - links) == []
    assert sorted(link for link in links if not (ROOT / link).exists()) == []


def test_the_site_navigation_has_every_page() -> None:
    nav = _nav_pages()
    pages = {str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md")}
    assert sorted(pages - nav) == []
    assert sorted(nav - pages) == []
