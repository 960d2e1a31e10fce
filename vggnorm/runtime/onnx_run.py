"""``verify``'s run of an ONNX original and its normalized copy in onnxruntime: the only module
that imports onnxruntime (optional: without it the run is skipped and said so).

Both graphs get the same check images, decoded and preprocessed as the statistics were (an ONNX
file does not record its preprocessing; the stats do), in the graph's own input layout. With a
head, their logits (before a final softmax) must agree as verify's head check demands; a graph
that ends in the conv chain outputs features divided by the last conv's scales, so the
normalized output times those scales must equal the original's.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..core.inputs import preprocess_images
from ..core.rescale import Scales
from ..core.statsrecord import StatsMeta
from ..core.topology import Loaded
from ..core.verdicts import OutputComparison
from ..formats.onnx_graph import Runnable, runnable
from .data import Dataset, iter_batches


def _session(graph: Runnable) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(graph.model, options, providers=["CPUExecutionProvider"])


def _run(session: Any, graph: Runnable, images: np.ndarray) -> np.ndarray:
    """One image at a time (a graph may fix its batch to 1), stacked."""
    x = images if graph.nhwc else images.transpose(0, 3, 1, 2)
    outs = [session.run([graph.output], {graph.input: x[i : i + 1]})[0] for i in range(len(x))]
    return np.concatenate(outs).astype(np.float64)


def check_onnx_files(
    orig: Loaded, norm: Loaded, ds: Dataset, items: Sequence[str], meta: StatsMeta,
    scales: Scales, notes: list[str],
) -> dict[str, float] | None:  # fmt: skip
    """Run both files in onnxruntime on ``items`` and judge their outputs; None when they are
    not both ONNX files, or onnxruntime is not installed (then a note says so)."""
    if orig.weights.file.format != "onnx" or norm.weights.file.format != "onnx":
        return None
    if importlib.util.find_spec("onnxruntime") is None:
        notes.append("onnxruntime is not installed: the ONNX files were not run side by side "
                     "(pip install 'vggnorm[onnx]')")  # fmt: skip
        return None
    graphs = [runnable(x.path) for x in (orig, norm)]
    sessions = [_session(g) for g in graphs]
    head = orig.bound.arch.head
    size = graphs[0].size or (head.input_size if head else None) or meta.size
    s_last = scales.values[orig.bound.conv_names[-1]]
    outputs = OutputComparison()
    for batch in iter_batches(ds, items, replace(meta.decode, size=size), 8):
        if not batch.items:
            continue
        x = preprocess_images(batch.images, meta.preprocess)
        ya, yb = (_run(sess, g, x) for sess, g in zip(sessions, graphs))
        if graphs[0].headless:  # features: the normalized ones are divided by s_last
            axis = 1 if graphs[0].output_nchw else -1
            yb = yb * np.expand_dims(s_last, tuple(a for a in range(yb.ndim) if a != axis % yb.ndim))
        outputs.add(ya, yb)
    return outputs.verdict()
