"""Entry point of a training process that runs a Python function instead of a script.

``python -m launchers.ray.child PAYLOAD RESULT``: load ``(function, args, kwargs)`` pickled by the
driver, call it under torch's ``@record`` (so a failure leaves torchrun's error file), and pickle
its return value to RESULT. Nothing else happens here.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    from ray import cloudpickle
    from torch.distributed.elastic.multiprocessing.errors import record

    payload, result = Path(sys.argv[1]), Path(sys.argv[2])
    function, args, kwargs = cloudpickle.loads(payload.read_bytes())
    value = record(function)(*args, **kwargs)
    temporary = result.with_suffix(".tmp")
    temporary.write_bytes(cloudpickle.dumps(value))
    temporary.replace(result)


if __name__ == "__main__":
    main()
