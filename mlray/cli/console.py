"""What the ``mlray`` command shows a person: one-line errors, JSON output, progress on a terminal.

Kept apart from :mod:`mlray.cli.commands` so the commands stay thin: they call library functions and hand the
results here to be printed.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from mlray.errors import MlrayError

USAGE_EXIT, FAILURE_EXIT = 2, 1


def one_line(err: BaseException) -> str | None:
    """A one-line message for a failure a user can cause, or None for a bug (which keeps its traceback)."""
    import requests

    if isinstance(err, MlrayError):
        return _joined(str(err))
    if isinstance(err, requests.ConnectionError):
        url = getattr(err.request, "url", None) or "the server"
        return f"cannot connect to {url}: connection refused or unreachable; is the app serving? (mlray serve)"
    if isinstance(err, requests.Timeout):
        return f"no answer from {getattr(err.request, 'url', None) or 'the server'} in time: {err}"
    if isinstance(err, FileNotFoundError):
        return f"no such file: {err.filename or err}"
    if isinstance(err, (IsADirectoryError, PermissionError)):
        return f"cannot read {err.filename or ''}: {err.strerror or err}"
    if _is_mlflow_error(err):
        return f"MLflow: {_joined(getattr(err, 'message', None) or str(err))}"
    if isinstance(err, ConnectionError):  # Ray's "could not find any running Ray instance"
        return f"cannot connect to Ray: {_joined(str(err))}; pass --address or set RAY_ADDRESS"
    return None


def _is_mlflow_error(err: BaseException) -> bool:
    module = sys.modules.get("mlflow.exceptions")
    return module is not None and isinstance(err, module.MlflowException)


def _joined(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def print_json(value: Any, *, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(json.dumps(value, indent=2, default=str) + "\n")


def print_status(status: dict[str, Any]) -> None:
    """An app's status (``mlray status`` / ``rollout``): registry targets, replicas, failures, shadow."""
    import typer

    if "models" in status:  # a many-models app
        live = len(status["replicas"])
        typer.echo(f"{len(status['models'])} models, at most {status['max_models_per_replica']} per replica, "
                   f"{live} replicas; on target: {status['on_target']}")
        for model in status["models"].values():
            print_model_status(model, replicas=live)
        return
    if "held_by" in status:  # one model of a many-models app (``mlray rollout NAME --app APP``)
        print_model_status(status, replicas=len(status["replicas"]))
        return
    targets = ", ".join(f"{role}=v{v}" for role, v in status["targets"].items() if v is not None)
    typer.echo(f"{status['model']}: registry says {targets}; on target: {status['on_target']}")
    for replica, r in sorted(status["replicas"].items()):
        versions = ", ".join(f"{role}=v{v}" for role, v in r["versions"].items())
        typer.echo(f"  replica {replica[:12]}  {versions}  (seen {r['seen_s_ago']} s ago)")
        for key, error in r["failures"].items():
            typer.secho(f"    FAILED {key}: {error}", fg=typer.colors.RED)
    shadow = status["shadow"]
    if shadow["compared"]:
        typer.echo(f"  shadow: {shadow['agreed']}/{shadow['compared']} answers agreed with the champion")


def print_model_status(model: dict[str, Any], *, replicas: int) -> None:
    """One model of a many-models app: its targets, the replicas holding it and at which version, failures."""
    import typer

    target = f"{model['model']}@{model['alias']}" if model["alias"] else f"{model['model']}/v{model['version']}"
    targets = ", ".join(f"{role}=v{v}" for role, v in model["targets"].items() if v is not None) or "nothing"
    typer.echo(f"{target}: registry says {targets}; held by {model['held_by']} of {replicas} replicas; "
               f"on target: {model['on_target']}")
    for replica, r in sorted(model["replicas"].items()):
        if r["held"]:
            versions = ", ".join(f"{role}=v{v}" for role, v in r["versions"].items())
            typer.echo(f"  replica {replica[:12]}  {versions}  (seen {r['seen_s_ago']} s ago)")
    for replica, failures in sorted(model["failures"].items()):
        for key, error in failures.items():
            typer.secho(f"  FAILED {key} on {replica[:12]}: {error}", fg=typer.colors.RED)


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


@contextlib.contextmanager
def progress(description: str, *, total: int | None = None) -> Iterator[Callable[[str], None]]:
    """A progress display on stderr while the block runs; yields ``step(message)``.

    On a terminal: a rich spinner (or a bar when ``total`` steps are known) whose line shows the last
    message. Piped or redirected: no display; each message is one plain line on stderr, so stdout holds
    only the command's result.
    """
    if not is_terminal():
        yield lambda message: print(message, file=sys.stderr, flush=True)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)

        def step(message: str) -> None:
            bar.update(task, description=f"{description}: {message}", advance=1 if total is not None else 0)

        yield step


def quickstart_report(result: Any) -> str:
    """What ``mlray quickstart`` prints at the end: predictions, accuracy, where everything is."""
    model = result.train.model_name
    lines = ["", "Predictions for real test images:"]
    for sample in result.samples:
        lines.append(f"  true {sample['true']}  predicted {sample['predicted']}  (p={sample['confidence']:.3f})")
    store = result.tracking_uri
    pixels = ", ".join(str(int(v)) for v in result.samples[0]["pixels"])
    auth = (f"Ray auth:        token in {result.ray_token_path} (mode 0600); this venv's `ray` and\n"
            "                 `serve` use it; the dashboard asks for it once (`ray get-auth-token`)\n"
            if result.ray_token_path else "")
    lines.append(f"""
Test accuracy:   {result.train.test_accuracy:.4f}  (run {result.train.run_id}, version {result.train.version})
Done in:         {result.seconds:.0f} s
Ray dashboard:   {result.dashboard_url}
MLflow UI:       mlflow ui --backend-store-uri {store} --host 127.0.0.1 --port 5000
Endpoint:        {result.url}/v1/models/{model}:predict
Try it (a {result.samples[0]["true"]}): curl -s -X POST {result.url}/v1/models/{model}:predict \\
                   -H 'Content-Type: application/json' -d '{{"instances": [[{pixels}]]}}'
{auth}Stop everything: mlray down""")
    return "\n".join(lines)
