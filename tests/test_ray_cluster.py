"""``--ray`` on a cluster of several nodes (``ray.cluster_utils.Cluster``, all on this machine):
a node lost mid-run changes nothing; a cluster lost entirely ends the run with its progress
saved, and ``--resume`` finishes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures.photos import write_photos
from vggnorm.cli import EXIT_OK, main
from vggnorm.commands.stats import collect_stats
from vggnorm.core.inputs import Decode
from vggnorm.core.statsrecord import StatsRecord
from vggnorm.formats.statsfile import read_stats

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.keras, pytest.mark.slow]
CHECK = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    root = tmp_path_factory.mktemp("cluster")
    write_photos(root / "images", [f"{i:03d}.jpg" for i in range(48)], seed=5, max_side=60)
    weights = save_downloaded_layout(tiny_vgg(size=32), root / "vgg16.h5")
    reference = collect_stats(weights, root / "images", decode=Decode(32), batch_size=2,
                              check_every=CHECK, workers=1)  # fmt: skip
    return {"root": root, "images": root / "images", "weights": weights, "reference": reference}


def _same(a: StatsRecord, b: StatsRecord) -> None:
    assert a.images == b.images
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.count == y.count and x.per_image is not None and y.per_image is not None
        for u, v in ((x.sum, y.sum), (x.sumsq, y.sumsq), (x.per_image.sum, y.per_image.sum)):
            np.testing.assert_allclose(u, v, rtol=1e-12)


def _cluster(nodes: int) -> Any:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    return cluster


def _kill(cluster: Any) -> None:
    """Every process of the cluster, killed: its nodes' own and the agents their raylets
    started (which outlive a killed raylet; they carry the node's id in their environment)."""
    import psutil

    ids = {node.node_id for node in cluster.list_all_nodes()}
    for node in cluster.list_all_nodes():
        node.kill_all_processes(check_alive=False, allow_graceful=False)
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_NODE_ID") in ids:
                proc.kill()
        except psutil.Error:
            continue


def test_a_node_lost_mid_run_changes_nothing(data: dict[str, Any]) -> None:
    from vggnorm.runtime.ray_engine import RayEngine

    cluster = _cluster(3)  # two workers of one CPU each, and a spare node to move to
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        engine = RayEngine(workers=2, cpus_per_worker=1)
        removed: list[str] = []

        def remove_a_worker_node(p: Any) -> None:
            if removed or p.done < 8:
                return
            used = {s.where["node_id"] for s in engine.slots}
            node = next(n for n in cluster.worker_nodes if n.node_id in used)
            cluster.remove_node(node, allow_graceful=False)
            removed.append(node.node_id)

        record = collect_stats(data["weights"], data["images"], decode=Decode(32), batch_size=2,
                               check_every=CHECK, engine=engine, progress=remove_a_worker_node)  # fmt: skip
        assert removed  # a node that ran a worker is gone: the run went on without it
        _same(record, data["reference"])
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_lost_cluster_ends_the_run_with_its_progress_saved(
    data: dict[str, Any], tmp_path: Path
) -> None:
    cluster = _cluster(2)
    out = tmp_path / "s.h5"
    argv = ["stats", "--data", str(data["images"]), "--weights", str(data["weights"]), "--size",
            "32", "--batch-size", "2", "--check-every", str(CHECK), "--out", str(out),
            "--checkpoint-every", "0", "-q"]  # fmt: skip
    ray_args = ["--ray", cluster.address, "--ray-workers", "2", "--ray-cpus-per-worker", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "vggnorm", *argv, *ray_args],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill(cluster)
        _, err = proc.communicate(timeout=90)  # never a hang: Ray alone would wait 60 s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        _kill(cluster)
    assert proc.returncode != EXIT_OK
    ours = [line for line in err.splitlines() if line.startswith("ERROR")]
    # vggnorm's one line; or none when Ray itself ended the driver the moment the raylet it
    # talks to died (it does so at once, outside Python: the checkpoint is then what is left)
    assert len(ours) <= 1
    if ours:
        assert "lost the Ray cluster" in ours[0] and "--resume" in ours[0]
    saved = read_stats(out)
    assert not saved.meta.complete and 0 < saved.meta.position < len(data["reference"].images)
    assert main([*argv, "--resume"]) == EXIT_OK  # here, without Ray: the same statistics
    _same(read_stats(out), data["reference"])
