"""The README's result tables are the ones in bench/results: a table that a script rewrote in bench/results but not
in the README (or one typed into the README) is a stale claim."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = dict(re.findall(r"<!-- ([a-z_]+:[a-z_]+) -->\n(.*?)<!-- /\1 -->", README, re.S))
RESULT_BLOCKS = sorted(name for name in BLOCKS if not name.startswith("bench:"))


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


# the scripts that also rewrite a README block
WRITTEN_TO_README = ("experiments", "ablation", "seeds", "score_rules", "condition_width")


def test_every_table_those_scripts_wrote_has_its_readme_block():
    written = {
        f"{family}:{md.stem[len(family) + 1 :]}"
        for family in WRITTEN_TO_README
        for md in (ROOT / "bench/results").glob(f"{family}_*.md")
    }
    assert written, "no bench/results table found"
    assert written <= set(RESULT_BLOCKS), f"tables with no README block: {sorted(written - set(RESULT_BLOCKS))}"


@pytest.mark.parametrize("name", RESULT_BLOCKS)
def test_a_readme_result_block_shows_the_rows_of_its_results_file(name):
    results = ROOT / "bench/results" / f"{name.replace(':', '_')}.md"
    assert results.is_file(), f"README block {name}: {results} is missing"
    rows = table_rows(BLOCKS[name])
    assert rows, f"README block {name} holds no table"
    assert rows == table_rows(results.read_text()), f"README block {name} differs from {results.name}"


# the README blocks bench/common.py's publish writes: the results file itself (experiments' blocks carry their own
# header line)
PUBLISHED = [name for name in RESULT_BLOCKS if not name.startswith("experiments:")]


@pytest.mark.parametrize("name", PUBLISHED)
def test_a_published_readme_block_is_its_results_file_with_links_into_bench_results(name):
    from bench.common import linked_from_readme

    results = ROOT / "bench/results" / f"{name.replace(':', '_')}.md"
    assert BLOCKS[name] == linked_from_readme(results.read_text()), f"README block {name} differs from {results.name}"


def test_every_plot_the_readme_links_into_bench_results_exists():
    linked = re.findall(r"\]\((bench/results/[^)]+)\)", README)
    assert linked, "the README links no plot in bench/results"
    assert [path for path in linked if not (ROOT / path).is_file()] == []
