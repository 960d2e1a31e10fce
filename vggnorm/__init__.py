"""vggnorm: normalize Keras VGG weights so every conv filter's mean activation is 1."""

from __future__ import annotations

__version__ = "0.1.0"
