"""Service settings from the environment (pydantic-settings).

Every setting has one environment variable (below); ``Settings(field=value)`` overrides it in
code and tests. ``get_settings()`` reads the environment once per process.

===========================  ====================================================================
``DATABASE_URL``             SQLAlchemy URL; default ``sqlite:///<home>/bitbench.sqlite``
``BITBENCH_API_TOKEN``       bearer token for writes; unset = writes are open
``BITBENCH_MAX_TRIALS``      largest grid one run may have (2,000)
``BITBENCH_DATA_DIR``        data sets (``workers.datasets``); also ``home`` when set
``BITBENCH_TUNE_DIR``        Ray Tune storage: a directory (made absolute) or a URI such as
                             ``s3://bucket/prefix``; default ``<home>/tune``
``RAY_ADDRESS``              Ray cluster to join; unset = a local Ray
``BITBENCH_HEARTBEAT_S``     dispatcher heartbeat period (5 s)
``BITBENCH_STALE_S``         a running run whose heartbeat is older is requeued (30 s)
``BITBENCH_MAX_BODY_BYTES``  largest request body (1 MiB)
``BITBENCH_ALLOWED_ORIGINS`` browser origins besides the service's own that may write, comma- or
                             space-separated (``https://bitbench.example.org``); default none
``BITBENCH_REPORT_RENDERS``  reports an API process renders at once (2); more get 503
===========================  ====================================================================

``home`` is ``BITBENCH_DATA_DIR`` or ``~/.cache/bitbench``.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.origins import canonical_origin
from workers.storage import normalise

DEFAULT_HOME = Path("~/.cache/bitbench")


def _env(name: str, env: str):
    """Field alias: the environment variable, or the field name in code."""
    return AliasChoices(name, env)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", validate_by_name=True)

    database_url: str = Field("", validation_alias=_env("database_url", "DATABASE_URL"))  # "" = SQLite in home
    api_token: str | None = Field(None, validation_alias=_env("api_token", "BITBENCH_API_TOKEN"))
    max_trials: int = Field(2000, ge=1, validation_alias=_env("max_trials", "BITBENCH_MAX_TRIALS"))
    data_dir: Path | None = Field(None, validation_alias=_env("data_dir", "BITBENCH_DATA_DIR"))
    tune_dir: str | None = Field(None, validation_alias=_env("tune_dir", "BITBENCH_TUNE_DIR"))
    ray_address: str | None = Field(None, validation_alias=_env("ray_address", "RAY_ADDRESS"))
    heartbeat_s: float = Field(5.0, gt=0, validation_alias=_env("heartbeat_s", "BITBENCH_HEARTBEAT_S"))
    stale_s: float = Field(30.0, gt=0, validation_alias=_env("stale_s", "BITBENCH_STALE_S"))
    max_body_bytes: int = Field(1 << 20, ge=1, validation_alias=_env("max_body_bytes", "BITBENCH_MAX_BODY_BYTES"))
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("allowed_origins", "BITBENCH_ALLOWED_ORIGINS"))

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origin_list(cls, value):
        return value.replace(",", " ").split() if isinstance(value, str) else value

    @field_validator("allowed_origins")
    @classmethod
    def _canonical_origins(cls, value: list[str]) -> list[str]:
        """Each as :func:`service.origins.canonical_origin` spells it; one that is no origin is an error."""
        origins = [canonical_origin(v) for v in value]
        bad = [v for v, origin in zip(value, origins, strict=True) if origin is None]
        if bad:
            raise ValueError(f"not an origin (scheme://host[:port], no path): {', '.join(bad)}")
        return [origin for origin in origins if origin is not None]
    report_renders: int = Field(2, ge=1, validation_alias=_env("report_renders", "BITBENCH_REPORT_RENDERS"))

    @field_validator("tune_dir", mode="before")
    @classmethod
    def _location_text(cls, value):
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _defaults(self):
        if self.data_dir is not None:
            self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'bitbench.sqlite'}"
        self.tune_dir = normalise(self.tune_dir or self.home / "tune")  # a URI, or an absolute path (Tune needs it)
        if not self.api_token:
            self.api_token = None
        return self

    @property
    def home(self) -> Path:
        """Where the default database and Tune storage live."""
        return (self.data_dir or DEFAULT_HOME).expanduser().resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings (cached; ``get_settings.cache_clear()`` re-reads the environment)."""
    return Settings()
