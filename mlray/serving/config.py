"""The Serve application's settings: the ``args`` of an app in a Serve YAML, or ``mlray serve`` flags."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    max_batch_size: int = Field(default=32, ge=1)
    # 0 by default: on a 2-core machine, making single-row requests wait for company cut throughput;
    # requests that arrive together are still batched.
    batch_wait_timeout_s: float = Field(default=0.0, ge=0)


class ServeAppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(..., description="registered model name")
    alias: str | None = "champion"
    version: int | None = Field(default=None, ge=1, description="a fixed version instead of an alias")
    tracking_uri: str | None = None
    max_rows: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    batching: BatchingConfig = BatchingConfig()

    @model_validator(mode="after")
    def _one_target(self) -> ServeAppConfig:
        if (self.alias is None) == (self.version is None):
            raise ValueError(f"give exactly one of alias ({self.alias!r}) or version ({self.version!r})")
        return self

    @property
    def target(self) -> str:
        return f"models:/{self.model}@{self.alias}" if self.alias else f"models:/{self.model}/{self.version}"
