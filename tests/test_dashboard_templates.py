"""The dashboard's Jinja2 templates ship in the package (pyproject's package-data)."""
import tomllib
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_template_is_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["*"]
    templates = sorted(p.name for p in (ROOT / "dashboard" / "templates").iterdir() if p.is_file())
    assert {"document.html", "results.md"} <= set(templates)
    assert [name for name in templates if not any(fnmatch(name, pattern) for pattern in patterns)] == []
