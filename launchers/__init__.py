"""Launchers: ``trainkit-run`` (torchrun-compatible), ``trainkit-ray`` (the same scripts on a Ray
cluster through Ray Train) and the pod-environment defaults trainkit-run applies."""
