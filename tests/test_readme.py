"""README facts that must not drift from the code."""
from pathlib import Path

from estimators.catalog import END, START, catalog_markdown, replace_block

README = Path(__file__).resolve().parent.parent / "README.md"


def test_estimator_catalogue_in_readme_is_current():
    text = README.read_text()
    assert replace_block(text, catalog_markdown()) == text, (
        "README's estimator catalogue is stale: run `python -m estimators.catalog --write README.md`")


def test_catalogue_lists_every_estimator():
    import estimators

    block = README.read_text().split(START)[1].split(END)[0]
    for name in estimators.list_estimators():
        assert f"#### `{name}`" in block


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text
