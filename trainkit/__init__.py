"""trainkit: a distributed PyTorch training runtime for Kubernetes pods.

``import trainkit`` is cheap and has no side effects; torch is imported when ``init()`` runs.
"""

from trainkit.dist import init, shutdown
from trainkit.world import World

__all__ = ["World", "__version__", "init", "shutdown"]

__version__ = "0.1.0"
