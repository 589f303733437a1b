"""mlray: train a PyTorch model data-parallel on Ray, track it in MLflow, serve it on Ray Serve.

Importing this package has no side effects: it starts no Ray, touches no MLflow store, creates no folder.
"""

__version__ = "0.1.0"
