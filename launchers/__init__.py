"""Launchers: ``trainkit-run`` (torchrun-compatible), the Ray launcher and pod-environment defaults."""
