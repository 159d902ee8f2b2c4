"""The elastic story, scaled down: preempted, a pod lost, a pod gained, every sample exactly once.

Three namespace pods with real DNS, ``trainkit-run --nnodes 2:3`` with the ``k8s`` backend and the
``trainkit rdzv-store`` pod, the main example's data and checkpoints on S3 (moto), every pod's
/metrics scraped by a real Prometheus. The full-size run is ``benchmarks/recovery.py``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tests.integration.elastic_story import ElasticStory, StoryConfig
from tests.integration.podnet import PodNet, netns_unavailable_reason, podnet

pytestmark = [
    pytest.mark.integration,
    pytest.mark.netns,
    pytest.mark.skipif(
        netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or ""
    ),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs prometheus"),
    pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="needs moto[server]"),
]

CI_STORY = StoryConfig(
    nproc_per_node=1,
    rows=1024,
    batch_size=16,
    hidden=32,
    save_every=10,
    steps_between=12,
    network_cut=False,
)


@pytest.mark.timeout(240)
def test_elastic_story_every_sample_once_and_restores_match_saves(
    podnet: PodNet,
    tmp_path: Path,
) -> None:
    story = ElasticStory(podnet, tmp_path, CI_STORY)
    try:
        story.run()
        report = story.report()
    finally:
        story.close_launchers()
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1))

    # Every SIGTERM: each launcher saved the agreed step and exited 75.
    assert report["exit_codes"] == {"w-0": [75, 75], "w-1": [75, 75], "w-2": [75], "w-3": [75]}
    # Exactly once per epoch across every world change; at least one epoch finished.
    epochs = report["epochs"]
    assert any(e["finished"] for e in epochs.values()), epochs
    assert all(e["exactly_once"] for e in epochs.values()), epochs
    assert report["incomplete_steps"] == []
    # Every restore loaded a step that was saved, with the same weights.
    assert report["restores"] and all(r["matches_save"] for r in report["restores"])
    failures = {f["kind"]: f for f in report["failures"]}
    lost = failures["sigkill"]
    assert lost["world_size_after"] == 2 and failures["join"]["world_size_after"] == 3
    # No more steps recomputed than those since the newest save that could have committed.
    assert 0 <= lost["steps_recomputed"] < 2 * CI_STORY.save_every, lost
    assert all(f["steps_recomputed"] == 0 for f in report["failures"] if f["kind"] == "sigterm")
    # A pod joining stops the others gracefully: they save the agreed step, nothing is recomputed.
    assert failures["join"]["steps_recomputed"] == 0, failures["join"]
    # Every recovery phase was measured.
    expected = {
        "failure->detected", "detected->rendezvous_begins", "rendezvous_begins->rendezvous_done",
        "rendezvous_done->process_started", "process_started->restored", "restored->first_step",
    }  # fmt: skip
    assert expected <= set(lost["phases_s"]), lost
    assert report["goodput"] and 0 < report["goodput_final"] <= 1
