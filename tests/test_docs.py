"""The docs as readers follow them: every relative link names a file of the repository and, after `#`, a heading
that file has (GitHub's anchors), so moving a section cannot leave a dead link behind."""

import glob
import os
import re
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [os.path.join(ROOT, "README.md")]


def prose(path: str) -> str:
    """The file without its code blocks: a `# comment` there is no heading, a `](x)` no link."""
    with open(path) as f:
        return re.sub(r"```.*?```", "", f.read(), flags=re.S)


def anchors(path: str) -> Iterator[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", prose(path), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield f"{slug}-{seen[slug]}" if seen[slug] else slug


def test_anchors_are_githubs(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Demo run (2D, `configs/demo.yaml`)\n## Contamination sweep, 2D: every version's runs\n# A\n# A\n")
    assert list(anchors(str(doc))) == ["demo-run-2d-configsdemoyaml", "contamination-sweep-2d-every-versions-runs",
                                       "a", "a-1"]  # fmt: skip


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(doc):
    dead = []
    for link in re.findall(r"\]\(([^)\s]+)\)", prose(doc)):
        if re.match(r"[a-z]+:", link):  # http(s), mailto: not followed offline
            continue
        target, _, anchor = link.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(doc), target)) if target else doc
        if not os.path.exists(path):
            dead.append(f"{link}: no file {os.path.relpath(path, ROOT)}")
        elif anchor and path.endswith(".md") and anchor not in set(anchors(path)):
            dead.append(f"{link}: no heading #{anchor} in {os.path.relpath(path, ROOT)}")
    assert not dead, f"{os.path.relpath(doc, ROOT)}: " + "; ".join(dead)
