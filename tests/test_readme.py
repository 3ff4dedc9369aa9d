"""README's first usage snippet runs as written, and the quickstart commands it names exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_usage_snippet_runs(capsys):
    readme = (ROOT / "README.md").read_text()
    snippet = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102 - our own documentation
    action, category = capsys.readouterr().out.split()[:2]
    assert action in {"allow", "hint", "refuse"}


def test_quickstart_commands_exist():
    readme = (ROOT / "README.md").read_text()
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in readme and (ROOT / script).is_file()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_example_runs(capsys):
    import runpy

    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("threshold")]
    assert lines[0].split()[2] == "allow"  # threshold 1.0 flags nothing
    assert lines[1].split()[2] in {"hint", "refuse"}  # threshold 0.0 flags every row


def test_readme_cites_the_paper_as_the_model_card_does():
    """One citation, from arXiv's author list (first author Zhendong Liu), in both places users copy it from."""
    readme = (ROOT / "README.md").read_text()
    card = (ROOT / "hub_cards" / "model_card_template.md").read_text()
    citations = [re.findall(r"```bibtex\n(.*?)```", text, flags=re.S) for text in (readme, card)]
    assert citations[0] and citations[0] == citations[1]
    assert "author={Zhendong Liu and" in citations[0][0] and "2405.13581" in citations[0][0]


def test_readme_table_of_bases_is_the_registry():
    """One row per `bases.BASES` entry: its name, classes, 7B-class preset and stock checkpoint."""
    from modeling_safe_llava.bases import BASES

    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| ") and "(`" in line]
    for base in BASES:
        row = next((line for line in rows if f"(`{base.name}`) |" in line), None)
        assert row is not None, f"README's table of bases has no row for {base.name!r}"
        for fact in (base.model_class.__name__, base.processor_class.__name__, base.large_preset, base.stock_checkpoint):
            assert fact in row, (base.name, fact)


# The depth README points to (issue 25: README is a landing page; each of these was one of its sections).
DOCS_PAGES = ("usage", "training", "calibration", "auditing", "serving", "gate_mode", "bases", "benchmarks", "layout")


def test_readme_is_a_landing_page_that_links_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in DOCS_PAGES:
        assert f"](docs/{page}.md" in readme and (ROOT / "docs" / f"{page}.md").is_file(), page


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{page}.md" for page in DOCS_PAGES)])
def test_relative_links_resolve(page):
    path = ROOT / page
    for target in re.findall(r"\]\((?!https?://|#)([^)#\s]+)", path.read_text()):
        assert (path.parent / target).exists(), f"{page} links {target}, which does not exist"
