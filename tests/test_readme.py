"""README facts that must not drift from the code."""
from pathlib import Path

from estimators.catalog import END, START, catalog_markdown, replace_block
from workers.data import catalog as dataset_catalog
from workers.data.synthetic import MAX_NUMBERS

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


def test_dataset_options_in_readme_are_current():
    text = README.read_text()
    block = dataset_catalog.options_markdown()
    assert replace_block(text, block, dataset_catalog.START, dataset_catalog.END) == text, (
        "README's data set options are stale: run `python -m workers.data.catalog --write README.md`")
    for option in ("val_size", "train_size", "split_seed", "shape", "n_train"):
        assert f"| `{option}` |" in block
    assert "download" not in block and "data_dir" not in block
    assert f"{MAX_NUMBERS:,} numbers" in text
