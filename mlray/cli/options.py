"""Options several ``mlray`` commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML job config (configs/*.yaml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--address", help="Ray cluster: the dashboard URL (http://HOST:8265) or the GCS address (HOST:6379); "
                      "default: $RAY_ADDRESS, a running cluster or a new local one")]
AppOpt = Annotated[str | None, typer.Option("--app", help="Serve application name (default: the model name)")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="Ray cluster: the dashboard URL or the GCS address (default: the local head mlray started)")]
