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


def test_readme_shows_the_answer_to_a_reused_idempotency_key(tmp_path):
    """The 422 quoted in the README is the one the API gives (and the second spec is not queued)."""
    import json

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    text = README.read_text()
    quoted = next(line for line in text.splitlines() if '"idempotency_conflict"' in line)
    assert "422" in text.split(quoted)[0].rsplit("Idempotency-Key", 1)[1]
    spec = {"name": "nightly", "estimators": ["ste"], "epochs": 1}
    headers = {"Idempotency-Key": "nightly-1"}
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'bb.sqlite'}", api_token=None)
    with TestClient(create_app(settings)) as client:
        assert client.post("/runs", json=spec, headers=headers).status_code == 202
        assert client.post("/runs", json={**spec, "epochs": 1, "seeds": [0]}, headers=headers).status_code == 200
        conflict = client.post("/runs", json={**spec, "epochs": 2}, headers=headers)
        assert conflict.status_code == 422 and conflict.json() == json.loads(quoted)
        assert client.get("/runs").json()["total"] == 1
