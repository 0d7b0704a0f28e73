"""Edge intelligence: feature extraction and rule baselines shared by training and runtime.

:mod:`.features` turns messages, sensor streams and client behaviour into float32 rows;
:mod:`.rules` scores those rows with fixed thresholds (the fallback when a model is
missing). The trained ONNX models and their manifests live in ``models/``.
"""

from .features import FEATURE_SPEC

__all__ = ["FEATURE_SPEC"]
