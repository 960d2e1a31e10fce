"""``vggnorm report``: show how unequal VGG's layers were and how equal normalization makes them.

Per conv layer, the distribution of per-filter mean activations and the dead and near-dead filters
(:func:`vggnorm.core.statsrecord.layer_summary`); with weights, the per-layer style and content
losses of Gatys et al. on a pair of images before and after normalization
(:mod:`vggnorm.core.losses`), and how far apart the layers' magnitudes are. Written as a PNG figure
(matplotlib, the ``plot`` extra) and a JSON summary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._version import __version__
from ..core.archs import Arch
from ..core.errors import DatasetError, OutOfMemoryError, VerificationError
from ..core.losses import finite, format_number, loss_magnitudes, shrink_text, spread_table
from ..core.precision import NEAR_DEAD_FRACTION
from ..core.rescale import DEAD_THRESHOLD, Scales, rescale
from ..core.scaling import check_fingerprint, scales_for
from ..core.statsrecord import StatsRecord, layer_summary, summary_line
from ..core.topology import named_as
from ..core.verdicts import FUNCTION_TOL, function_errors
from ..formats.outputs import atomic_path, check_output, output_lock
from ..formats.registry import load


@dataclass(frozen=True)
class ReportResult:
    """What ``report`` wrote: the figure, the JSON file and the numbers in it."""

    png: Path
    json_path: Path
    data: dict[str, Any]

    def summary(self) -> list[str]:
        return [*summary_text(self.data), f"wrote {self.png} and {self.json_path}"]

    def to_dict(self) -> dict[str, Any]:
        return self.data


def style_content_spread(
    arch: Arch,
    arrays: Mapping[str, np.ndarray],
    norm_arrays: Mapping[str, np.ndarray] | None,
    scales: Scales,
    images_uint8: npt.NDArray[np.uint8],
    preprocess: str = "caffe",
) -> dict[str, Any]:
    """Per-layer style and content losses between two images, before and after normalization.

    Args:
        arch: the conv chain (a head is ignored).
        arrays: the original weights, keyed ``"<layer>/kernel"``/``"<layer>/bias"``.
        norm_arrays: the normalized weights under the same keys, e.g. read from ``apply``'s
            output; None computes them with :func:`vggnorm.core.rescale.rescale`.
        scales: the per-filter scales of the normalization (from the stats file). They tie the
            two weight sets together: the normalized activations times the scales must give the
            original activations.
        images_uint8: the pair of images, ``(2, size, size, 3)`` uint8 RGB.
        preprocess: ``caffe``, ``unit`` or ``torch``, as the stats were gathered.

    Returns:
        :func:`spread_table`'s dict (``layers`` with ``style_before``/``after`` and
        ``content_before``/``after``; ``style`` and ``content`` with ``spread_before``,
        ``spread_after`` and ``factor`` = before / after), plus ``function_rel_err`` (worst layer
        of ``max |a_norm * s - a| / max |a|``), ``size`` and ``preprocess``.

    Raises:
        ValueError: not a pair of square uint8 RGB images.
        VerificationError: ``norm_arrays`` is not ``arrays`` normalized with ``scales``.

    Example:
        >>> r = style_content_spread(arch, ws.arrays, None, scales, pair)  # doctest: +SKIP
        >>> r["style"]["factor"]  # doctest: +SKIP
        3.1e+07
    """
    from ..core.inputs import Preprocess
    from ..runtime.network import FeatureNet

    images = _image_pair(images_uint8)
    size = int(images.shape[1])
    features = arch.without_head()
    if norm_arrays is None:
        norm_arrays = rescale(arrays, scales, norms=features.norms)  # the convs: no head here
    scheme: Preprocess = preprocess  # type: ignore[assignment]
    orig = FeatureNet(features, arrays, size, scheme, outputs="activations").activations(images)
    norm = FeatureNet(features, norm_arrays, size, scheme, outputs="activations").activations(
        images
    )
    names = features.conv_names
    worst = max(function_errors(orig, norm, [scales.values[n] for n in names]))
    if worst > FUNCTION_TOL:
        raise VerificationError(
            f"the normalized weights times the scales differ from the original activations by "
            f"{worst:.3g} of a layer's largest activation: they are not this model normalized "
            "with these statistics"
        )
    table = spread_table(_pair_losses(names, orig), _pair_losses(names, norm))
    table.update(function_rel_err=worst, size=size, preprocess=preprocess)
    return table


def _image_pair(images_uint8: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.shape[0] != 2 or images.shape[3] != 3:
        raise ValueError(f"expected a pair of RGB images (2, size, size, 3), got {images.shape}")
    if images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        raise ValueError(f"images must be square uint8, got {images.shape} {images.dtype}")
    return images


def _pair_losses(names: Sequence[str], acts: Sequence[np.ndarray]) -> dict[str, dict[str, float]]:
    """Per layer, the losses between the two images of a batch's activations."""
    return loss_magnitudes({n: a[0] for n, a in zip(names, acts)},
                           {n: a[1] for n, a in zip(names, acts)})  # fmt: skip



def report_dict(
    record: StatsRecord,
    *,
    style: Mapping[str, Any] | None = None,
    dead_threshold: float = DEAD_THRESHOLD,
) -> dict[str, Any]:
    """The JSON summary :func:`write_report` writes (non-finite numbers as None)."""
    m = record.meta
    out: dict[str, Any] = finite(
        {
            "format": "vggnorm-report",
            "tool_version": __version__,
            "model": m.model,
            "fingerprint": m.fingerprint,
            "images": record.n_images,
            "size": m.size,
            "preprocess": m.preprocess,
            "precision": m.precision,
            "dataset": m.dataset_path,
            "complete": m.complete,
            "dead_threshold": dead_threshold,
            "near_dead_fraction": NEAR_DEAD_FRACTION,
            "layers": layer_summary(record, dead_threshold),
            "intervals": record.intervals(),
            "style": dict(style) if style is not None else None,
        }
    )
    return out


def summary_text(report: Mapping[str, Any]) -> list[str]:
    """Human-readable lines of a :func:`report_dict` (for the console)."""
    lines = [summary_line(r) for r in report["layers"]]
    for p in report.get("intervals") or []:
        lines.append(f"{p['name']:<16} 95% interval of the means: ±{p['median']:.2%} median "
                     f"filter, ±{p['p99']:.2%} 99th percentile, ±{p['worst']:.2%} worst")  # fmt: skip
    style = report.get("style")
    if style:
        for kind in ("style", "content"):
            s = style[kind]
            lines.append(
                f"{kind} loss spread across layers (max/min): {format_number(s['spread_before'])} "
                f"before, {format_number(s['spread_after'])} after: {shrink_text(s['factor'])}"
            )
    return lines


def write_report(
    record: StatsRecord,
    out_png: str | os.PathLike[str],
    out_json: str | os.PathLike[str] | None = None,
    *,
    style: Mapping[str, Any] | None = None,
    dead_threshold: float = DEAD_THRESHOLD,
    force: bool = True,
) -> ReportResult:
    """Write the normalization figure (PNG, see :func:`vggnorm.commands._figures.draw_report`)
    and its numbers (JSON, :func:`report_dict`), each atomically, each under its own lock.

    Args:
        record: the statistics.
        out_png: the figure; ``out_json`` defaults to it with a ``.json`` suffix.
        style: the result of :func:`style_content_spread`, or None.
        dead_threshold: as in ``apply``.
        force: overwrite existing outputs.

    Returns:
        The paths written and the JSON summary.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'vggnorm[plot]'``).
        StatsError: a layer has no activation counted.
        OutputError: an output exists (without ``force``) or cannot be written.
    """
    from ._figures import draw_report, need_matplotlib

    png = Path(out_png)
    js = Path(out_json) if out_json is not None else png.with_suffix(".json")
    need_matplotlib("the report figure")
    with output_lock(png), output_lock(js):
        for path in (png, js):
            check_output(path, force=force)
        summary = report_dict(record, style=style, dead_threshold=dead_threshold)
        draw_report(record, summary, png, style=style, dead_threshold=dead_threshold)
        with atomic_path(js) as tmp:
            tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf8")
    return ReportResult(png, js, summary)


def loss_spread_for(
    weights: str | os.PathLike[str],
    record: StatsRecord,
    *,
    images: Sequence[str | os.PathLike[str]] | None = None,
    normalized: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """:func:`style_content_spread` for a weight file and its stats: the first two stats images
    (or ``images``), the normalized file's weights (or the rescaling computed in memory).

    Raises:
        StatsError: stats of another model; DatasetError: fewer than two images.
    """
    from ..runtime.data import load_image

    loaded = load(weights).as_measured(record.meta.padding, record.meta.pooling)
    check_fingerprint(loaded, record)
    paths = [Path(p) for p in images] if images else [
        Path(record.meta.dataset_root) / item for item in record.images[:2]
    ]  # fmt: skip
    if len(paths) < 2:
        raise DatasetError("the loss panel needs two images", fix="images")
    pair = np.stack([load_image(p, record.meta.decode) for p in paths])
    norm = named_as(load(normalized), loaded) if normalized else None
    try:
        return style_content_spread(
            loaded.bound.arch, loaded.arrays, norm, scales_for(record, loaded.bound), pair,
            record.meta.preprocess,
        )  # fmt: skip
    except OutOfMemoryError as e:  # no batch to lower: two images at the statistics' size
        raise OutOfMemoryError(f"{e}; the loss panel runs its two images at the size the "
                               "statistics were gathered at") from e  # fmt: skip
