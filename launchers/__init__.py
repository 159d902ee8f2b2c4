"""Launchers: ``trainkit-run`` (torchrun-compatible) and the pod-environment defaults it applies."""
