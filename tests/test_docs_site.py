"""The documentation site builds with ``mkdocs build --strict``: no warning, no broken link or
anchor, no unresolved cross-reference, and purekd's reST docstrings come out as Markdown.

Needs the ``docs`` extra (``pip install -e ".[docs]"``, or ``scripts/docs.sh``); skipped
without it. The build takes about 10 s.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

for _module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "pymdownx"):
    pytest.importorskip(_module, reason="the docs extra is not installed (pip install -e '.[docs]')")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once for this module; the build's log must hold no warning."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    log = build.stdout + build.stderr
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert "WARNING" not in log, log
    return out


def test_every_page_in_the_nav_is_built(site: Path) -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    pages = re.findall(r"^\s*- (?:[^:\n]+: )?(\S+\.md)\s*$", config, flags=re.M)
    assert {"index.md", "concepts.md", "quickstart.md", "composing.md", "foreign-loops.md",
            "migrating.md", "losses.md", "benchmarks.md", "api/losses.md"} <= set(pages)
    for page in pages:
        built = site / ("index.html" if page == "index.md"
                        else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), f"{page} was not built"


def _article(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text[text.index("<article"):text.index("</article>")]


def test_api_pages_render_the_docstrings_reST_as_markdown(site: Path) -> None:
    api = sorted((site / "api").glob("*/index.html"))
    assert len(api) >= 10
    for page in api:
        article = _article(page)
        for leftover in (":func:`", ":class:`", ":math:`", ".. math::", "&gt;&gt;&gt; "):
            outside_code = re.sub(r"<(pre|code)\b.*?</\1>", "", article, flags=re.S)
            assert leftover not in outside_code, f"{page.parent.name}: raw {leftover!r}"
    losses = _article(site / "api" / "losses" / "index.html")
    assert 'id="purekd.losses.kd_ce"' in losses
    assert losses.count('class="arithmatex"') >= 10  # the formulas of the docstrings
    combinators = _article(site / "api" / "combinators" / "index.html")
    assert '<span class="gp">&gt;&gt;&gt; </span>' in combinators  # a doctest, highlighted
    assert 'href="#purekd.combinators.chain"' in combinators  # a resolved :func: reference


def test_foreign_loop_examples_are_included(site: Path) -> None:
    page = _article(site / "foreign-loops" / "index.html")
    for example in ("plain_pytorch", "hf_trainer", "lightning_module", "accelerate_loop"):
        assert f"examples/foreign_loops/{example}.py" in page
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert "--8<--" not in text  # every snippet was replaced by the file's text
    assert 'train_sampling_strategy="sequential"' in text  # a line of hf_trainer.py
