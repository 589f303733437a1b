"""Serving: the Ray Serve app that loads ``models:/NAME@ALIAS`` from the registry.

Serving never imports training; both meet only at the registry and :mod:`mlray.artifact`.
"""
