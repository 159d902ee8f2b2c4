"""``trainkit-ray``: the same training script or function on a Ray cluster through Ray Train.

Each worker gets torchrun's environment, so ``trainkit.init()`` and the checkpoint, data and metrics
features behave as under trainkit-run. Importing this package imports neither Ray nor torch.
"""

from launchers.ray.api import DEFAULT_GRACE_PERIOD_S, LaunchResult, run

__all__ = ["DEFAULT_GRACE_PERIOD_S", "LaunchResult", "run"]
