"""Time the on-device moment reduction vggnorm adds to each conv layer.

Runs the reduction of vggnorm.runtime.network (row sums of x and x*x in the activation's dtype, float64
beyond) on one block1-sized activation batch (16 x 224 x 224 x 64, post-ReLU), in float32 and
bfloat16: with and without XLA, the sum alone, and through a float32 or float64 copy of the
activations (what earlier versions did: Keras autocast the layer input to float64).

    python scripts/bench_moments.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    import tensorflow as tf

    def moments(x: tf.Tensor) -> tf.Tensor:  # the same arithmetic as vggnorm.runtime.network
        rows = tf.stack([tf.reduce_sum(x, 2), tf.reduce_sum(x * x, 2)])
        return tf.reduce_sum(tf.cast(rows, tf.float64), (1, 2))

    def via_float32(x: tf.Tensor) -> tf.Tensor:  # before: a float32 copy of bf16 activations
        return moments(tf.cast(x, tf.float32))

    def via_float64(x: tf.Tensor) -> tf.Tensor:  # before that: Keras autocast to float64
        return moments(tf.cast(x, tf.float64))

    def sum_only(x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(tf.cast(tf.reduce_sum(x, 2), tf.float64), (0, 1))

    act = tf.nn.relu(tf.random.normal((16, 224, 224, 64), seed=0))
    print("ms per 16x224x224x64 activation batch")
    for dtype in (tf.float32, tf.bfloat16):
        x = tf.cast(act, dtype)
        for name, fn, xla in (("sum + sum of squares", moments, False),
                              ("sum only", sum_only, False),
                              ("sum + sum of squares, XLA", moments, True),
                              ("via a float32 copy", via_float32, False),
                              ("via a float64 copy", via_float64, False)):  # fmt: skip
            inner = tf.function(fn, jit_compile=xla)
            step = tf.function(lambda t, inner=inner: inner(t))
            step(x)
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < args.seconds:
                step(x).numpy()
                n += 1
            ms = (time.perf_counter() - start) / n * 1000
            print(f"{dtype.name:<9} {name:<30} {ms:7.1f}")


if __name__ == "__main__":
    main()
