"""Recovery of the elastic story: failure to training again, per phase, per variant.

    sudo .venv/bin/python benchmarks/recovery.py                  # every variant, full size (~11 min)
    sudo .venv/bin/python benchmarks/recovery.py --variants fork  # only trainkit's default

The story (tests/integration/elastic_story.py) on 3 namespace pods x 2 processes, ``trainkit-run
--nnodes 2:3`` with the ``k8s`` backend, the rdzv-store pod, data and checkpoints on S3 (moto in a
pod), Prometheus scraping every pod: SIGTERM to every pod (exit 75) and restart; SIGKILL of a
whole pod; a new pod joining; a pod's network cut. ``fork`` is trainkit's default: DNS membership
(rounds close when every live pod in DNS joined; pods that left DNS leave the rendezvous at once
and their round's survivors restart) and the fork server (restarted workers are forked from a
process that imported torch once); ``dns`` is the same with ``--no-fork-workers``; ``timeouts``
is the story with ``dns_membership=0`` and no fork server: torch's keep-alive and last-call
timeouts alone, the baseline every ratio is taken against. Writes
benchmarks/results/recovery.{json,png} (the timeline of the ``fork`` run, else ``dns``) and
prints a phase table. Needs root, iproute2, dnsmasq, prometheus, moto.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.elastic_story import ElasticStory, StoryConfig  # noqa: E402
from tests.integration.podnet import PodNet, netns_unavailable_reason  # noqa: E402

PHASES = (
    "failure->exited",
    "failure->detected",
    "exited->detected",
    "detected->rendezvous_begins",
    "rendezvous_begins->rendezvous_done",
    "rendezvous_done->process_started",
    "process_started->restored",
    "restored->first_step",
)


#: Variant name -> (dns_membership, fork_workers).
VARIANTS = {"fork": (True, True), "dns": (True, False), "timeouts": (False, False)}


def run_variant(variant: str, workdir: Path) -> dict:
    dns_membership, fork_workers = VARIANTS[variant]
    config = StoryConfig(dns_membership=dns_membership, fork_workers=fork_workers, wait_s=240)
    with PodNet() as net:
        story = ElasticStory(net, workdir, config)
        try:
            story.run()
            return story.report()
        finally:
            story.close_launchers()


def print_table(results: dict[str, dict]) -> None:
    """Seconds per phase and variant; ratios of every variant against the last one (the baseline)."""
    variants = list(results)
    baseline = variants[-1]
    ratios = [f"{v}/{baseline}" for v in variants[:-1]]
    print(
        f"{'event':<12} {'phase':<36} "
        + " ".join(f"{v:>10}" for v in variants)
        + "  "
        + " ".join(f"{r:>14}" for r in ratios)
    )
    kinds = [f["kind"] for f in results[variants[0]]["failures"]]
    for index, kind in enumerate(kinds):
        rows = [results[v]["failures"][index] for v in variants]
        for phase in (*PHASES, "total", "steps_recomputed"):
            values = []
            for row in rows:
                if phase == "total":
                    values.append(row["total_s"])
                elif phase == "steps_recomputed":
                    values.append(row["steps_recomputed"])
                else:
                    values.append(row["phases_s"].get(phase))
            if all(v is None for v in values):
                continue
            shown = " ".join(f"{v:>10}" if v is not None else f"{'-':>10}" for v in values)
            last = values[-1]
            shown_ratios = " ".join(
                f"{value / last:>14.2f}" if value is not None and last else f"{'-':>14}"
                for value in values[:-1]
            )
            print(f"{kind:<12} {phase:<36} {shown}  {shown_ratios}")
    for variant, result in results.items():
        print(f"{variant}: goodput at the end {result['goodput_final']}")


def plot_timeline(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = result["started_at"]
    timeline = result["timeline"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True, height_ratios=[1, 2])
    times = [t - t0 for t, _ in timeline["world_size"]]
    top.step(times, [w for _, w in timeline["world_size"]], where="post", color="tab:blue")
    top.set_ylabel("world size")
    top.set_ylim(0, max(w for _, w in timeline["world_size"]) + 1)
    goodput = result["goodput"]
    if goodput:
        ratio = top.twinx()
        ratio.plot([t - t0 for t, _ in goodput], [v for _, v in goodput], color="tab:green")
        ratio.set_ylabel("goodput", color="tab:green")
        ratio.set_ylim(0, 1)
    steps = timeline["steps"]
    bottom.plot([t - t0 for t, _ in steps], [s for _, s in steps], ".", markersize=1.5)
    saves = timeline["saves"]
    bottom.plot([t - t0 for t, _ in saves], [s for _, s in saves], "|", color="tab:orange",
                markersize=8, label="checkpoint saved")  # fmt: skip
    for failure in result["failures"]:
        for axis in (top, bottom):
            axis.axvline(failure["at"] - t0, color="tab:red", linewidth=0.8, linestyle="--")
        bottom.annotate(
            failure["kind"], (failure["at"] - t0, 0), rotation=90, fontsize=7, color="tab:red",
            xytext=(2, 2), textcoords="offset points", va="bottom",
        )  # fmt: skip
    bottom.set_xlabel("seconds since the job started")
    bottom.set_ylabel("step")
    bottom.legend(loc="upper left", fontsize=8)
    top.set_title("elastic story: 3 pods x 2 processes, k8s rendezvous, S3 checkpoints")
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants",
        default="fork,dns,timeouts",
        help="comma list of fork, dns, timeouts; the last one is the baseline of the ratios",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"recovery benchmark: {reason}", file=sys.stderr)
        return 2
    results: dict[str, dict] = {}
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory(prefix=f"trainkit-recovery-{variant}-") as workdir:
            results[variant] = run_variant(variant, Path(workdir))
            print(f"{variant}: done", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print_table(results)
    summary = {
        variant: {key: value for key, value in result.items() if key != "timeline"}
        for variant, result in results.items()
    }
    (out / "recovery.json").write_text(json.dumps(summary, indent=1))
    shown = next((v for v in ("fork", "dns") if v in results), None)
    if shown is not None:
        plot_timeline(results[shown], out / "recovery.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
