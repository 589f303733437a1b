"""`serve run serve_apps.digits:app model=digits` or `serve deploy serve_apps/digits.yaml`."""

from mlray.serving.app import build_app

app = build_app  # an application builder: Serve calls it with the YAML's `args`
