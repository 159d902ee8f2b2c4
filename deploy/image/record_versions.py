"""Write what the image really holds (torch, NCCL, rdma-core versions) to a JSON file.

Runs once inside the image build; deploy/image/build.sh turns the file into image labels, so a label
can never claim a version the image does not have. Usage: python record_versions.py OUTPUT.json
"""

from __future__ import annotations

import json
import subprocess
import sys


def nccl_version() -> str:
    import torch

    if not torch.backends.cuda.is_built():
        return "none"
    try:
        return ".".join(str(part) for part in torch.cuda.nccl.version())
    except (RuntimeError, AttributeError):  # a CUDA build whose libnccl cannot be loaded here
        return "unknown"


def debian_package_version(package: str) -> str:
    result = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "none"


def main(output: str) -> None:
    import torch

    versions = {
        "torch": torch.__version__,
        "nccl": nccl_version(),
        "rdma-core": debian_package_version("rdma-core"),
        "python": sys.version.split()[0],
    }
    with open(output, "w") as handle:
        json.dump(versions, handle, indent=2, sort_keys=True)
    print(f"image versions: {versions}")


if __name__ == "__main__":
    main(sys.argv[1])
