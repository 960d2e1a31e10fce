"""``--ray``: the cluster run equals the single-process run, survives killed workers and drivers,
and names the node that cannot read the dataset (one local Ray cluster for the module)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures.photos import write_photos
from vggnorm.cli import EXIT_OK, main
from vggnorm.commands.stats import collect_stats
from vggnorm.core.errors import DatasetError
from vggnorm.core.inputs import Decode
from vggnorm.core.statsrecord import StatsRecord
from vggnorm.formats.statsfile import read_stats
from vggnorm.runtime.data import open_dataset

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.keras]
N_IMAGES = 22  # with an empty file among them: skips move the batch boundaries
CHECK = 4  # check points every 4 items: several blocks per run


@pytest.fixture(scope="module")
def cluster() -> object:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, StatsRecord]:
    from fixtures.keras_files import save_downloaded_layout, tiny_vgg

    root = tmp_path_factory.mktemp("raydata")
    write_photos(root, [f"{i:02d}.jpg" for i in range(N_IMAGES)], 3, max_side=70)
    (root / "zero.jpg").write_bytes(b"")
    weights = save_downloaded_layout(tiny_vgg(arch="vgg16"), root.parent / "vgg16_notop.h5")
    reference = collect_stats(weights, root, decode=Decode(32), batch_size=2, check_every=CHECK)
    return root, weights, reference


def _engine(workers: int, **kw: object) -> object:
    from vggnorm.runtime.ray_engine import RayEngine

    return RayEngine(workers=workers, cpus_per_worker=1, **kw)  # type: ignore[arg-type]


def _same(a: StatsRecord, b: StatsRecord) -> None:
    assert a.images == b.images
    assert a.skipped == b.skipped
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.count == y.count
        np.testing.assert_allclose(x.sum, y.sum, rtol=1e-12)
        np.testing.assert_allclose(x.sumsq, y.sumsq, rtol=1e-12)
        assert x.per_image is not None and y.per_image is not None
        assert x.per_image.images == y.per_image.images == len(a.images)
        np.testing.assert_allclose(x.per_image.sum, y.per_image.sum, rtol=1e-12)
        np.testing.assert_allclose(x.per_image.sumsq, y.per_image.sumsq, rtol=1e-12)


def test_one_and_two_workers_equal_the_single_process_run(cluster: object, setup: tuple) -> None:
    root, weights, reference = setup
    assert reference.skipped  # the empty file
    lines: list[str] = []
    for n in (1, 2):
        engine = _engine(n, report=lines.append)
        _same(
            collect_stats(weights, root, decode=Decode(32), batch_size=2, engine=engine,
                          check_every=CHECK), reference
        )
    assert any("ray worker 1:" in line and "img/s" in line for line in lines)


def test_a_worker_killed_mid_run_changes_nothing(cluster: object, setup: tuple) -> None:
    root, weights, reference = setup
    engine = _engine(2)
    killed: list[int] = []

    def kill_first_worker(_: object) -> None:
        if not killed:
            pid = engine.slots[0].where["pid"]  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    record = collect_stats(weights, root, decode=Decode(32), batch_size=2, engine=engine,
                           progress=kill_first_worker, check_every=CHECK)  # fmt: skip
    assert killed
    _same(record, reference)


def test_verify_remeasures_on_the_cluster_with_the_same_result(
    cluster: object, setup: tuple, tmp_path: Path
) -> None:
    from vggnorm.commands.apply import normalize
    from vggnorm.commands.verify import verify
    from vggnorm.formats.statsfile import write_stats

    _, weights, reference = setup
    stats, out = tmp_path / "s.h5", tmp_path / "n.h5"
    write_stats(stats, reference)
    normalize(weights, out, stats)
    here = verify(out, batch_size=2)
    there = verify(out, batch_size=2, engine=_engine(2))
    assert here.ok and there.ok and there.means_checked
    for a, b in zip(here.layers, there.layers, strict=True):
        assert (a.mean_min, a.mean_median, a.mean_max) == pytest.approx(
            (b.mean_min, b.mean_median, b.mean_max), rel=1e-12
        )


def test_killed_driver_resumes_to_the_same_result(
    cluster: str, setup: tuple, tmp_path: Path
) -> None:
    root, weights, reference = setup
    out = tmp_path / "s.npz"
    argv = ["stats", "--data", str(root), "--weights", str(weights), "--size", "32",
            "--batch-size", "2", "--out", str(out), "--checkpoint-every", "0", "-q",
            "--check-every", str(CHECK)]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vggnorm",
            *argv,
            "--ray",
            cluster,
            "--ray-workers",
            "1",
            "--ray-cpus-per-worker",
            "1",
        ],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert out.exists()
    saved = read_stats(out)
    assert not saved.meta.complete and 0 < saved.meta.position < N_IMAGES + 1
    assert (
        main([*argv, "--resume", "--ray", "--ray-workers", "2", "--ray-cpus-per-worker", "1"])
        == EXIT_OK
    )
    _same(read_stats(out), reference)


def test_unreadable_dataset_on_a_worker_names_the_node(
    cluster: object, setup: tuple, tmp_path: Path
) -> None:
    _, weights, _ = setup
    root = tmp_path / "gone"
    write_photos(root, ["a.jpg", "b.jpg"], 1)
    ds = open_dataset(root)  # the driver listed it; the workers find it gone
    root.rename(tmp_path / "moved")
    with pytest.raises(DatasetError) as e:
        collect_stats(weights, ds, decode=Decode(32), batch_size=2, engine=_engine(1))
    msg = str(e.value)
    assert "\n" not in msg
    assert "Ray worker on node" in msg and ray.util.get_node_ip_address() in msg
    assert str(root) in msg


def test_a_target_stops_ray_where_the_single_process_run_stops(
    cluster: object, setup: tuple
) -> None:
    root, weights, _ = setup
    figures: dict[int, float] = {}

    def progress(p: object) -> None:
        if p.done % CHECK == 0 and p.precision is not None:  # type: ignore[attr-defined]
            figures[p.done] = p.precision  # type: ignore[attr-defined]

    kw = {"decode": Decode(32), "batch_size": 2, "check_every": CHECK, "target_quantile": 0.5}
    collect_stats(weights, root, progress=progress, **kw)  # type: ignore[arg-type]
    points = sorted(figures.items())
    # a target between the first and the second check point's figure after position 8, far
    # (relative 1e-5) from both, so that float64 rounding cannot move the stop
    k = next(i for i in range(2, len(points)) if points[i][1] < min(f for _, f in points[:i]) * 0.99999)
    stop, before = points[k][0], min(f for _, f in points[:k])
    error = (points[k][1] + before) / 2
    here = collect_stats(weights, root, target_error=error, min_images=2, **kw)  # type: ignore[arg-type]
    assert here.meta.position == stop and here.meta.target_reached
    for n in (1, 2):
        there = collect_stats(weights, root, target_error=error, min_images=2, engine=_engine(n),
                              **kw)  # type: ignore[arg-type]  # fmt: skip
        assert there.meta.position == stop and there.meta.target_reached
        _same(there, here)  # nothing a worker computed past the stop was counted


def test_each_worker_chooses_its_batch_with_the_same_result(cluster: object, setup: tuple) -> None:
    from vggnorm.core.memory import activation_bytes, fixed_bytes
    from vggnorm.formats.registry import load

    root, weights, reference = setup  # the reference ran in batches of 2
    arch = load(weights).bound.arch
    budget = fixed_bytes(arch) + 2 * activation_bytes(arch, 32)  # exactly two images fit
    lines: list[str] = []
    plans: list[object] = []
    record = collect_stats(weights, root, decode=Decode(32), max_memory=budget, check_every=CHECK,
                           engine=_engine(2, report=lines.append), on_plan=plans.append)  # fmt: skip
    _same(record, reference)
    assert record.meta.batch_size == 2 and [p.batch for p in plans] == [2]  # type: ignore[attr-defined]
    chose = [line for line in lines if line.startswith("ray worker") and "batch 2 at 32x32" in line]
    assert len(chose) == 2 and all("the given maximum" in line for line in chose)
