"""Candidate models for the OTA install tests: the shipped ones, and real ONNX graphs built
with ``onnx.helper`` that are deliberately worse (a constant label) or that raise in
onnxruntime for some batch sizes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from rapidmq_edge.ota.slots import ModelInfo

MODELS = Path(__file__).resolve().parent.parent / "models"


def shipped(name: str) -> dict[str, Any]:
    """The shipped model's manifest (golden rows = validation vectors)."""
    doc: dict[str, Any] = json.loads((MODELS / f"{name}.json").read_text())
    return doc


def vectors(name: str) -> list[list[Any]]:
    """The shipped model's golden rows as (row, label) validation vectors."""
    gold = shipped(name)["golden"]
    return [[row, label] for row, label in zip(gold["inputs"], gold["labels"], strict=True)]


def copy_shipped(name: str, dest: Path) -> Path:
    """The shipped model as a candidate file (same bytes: a "same" model)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODELS / f"{name}.onnx", dest)
    return dest


def constant_model(dest: Path, width: int, n_labels: int, label: int,
                   batch_multiple: int = 1) -> Path:
    """An ONNX graph answering ``label`` for every row (confidence 0.94). With
    ``batch_multiple`` > 1 it reshapes its input to ``[batch_multiple, -1]`` first, so
    onnxruntime raises for a batch whose size is not a multiple of it."""
    from onnx import TensorProto, helper, save

    probs = np.full((1, n_labels), 0.02, np.float32)
    probs[0, label] = 1.0 - 0.02 * (n_labels - 1)
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("probs", TensorProto.FLOAT, [1, n_labels], probs.ravel().tolist()),
    ]
    nodes = []
    src = "features"
    if batch_multiple > 1:
        inits += [helper.make_tensor("split", TensorProto.INT64, [2], [batch_multiple, -1]),
                  helper.make_tensor("back", TensorProto.INT64, [2], [-1, width])]
        nodes += [helper.make_node("Reshape", ["features", "split"], ["r"]),
                  helper.make_node("Reshape", ["r", "back"], ["f2"])]
        src = "f2"
    nodes += [
        helper.make_node("ReduceSum", [src, "axes"], ["s"], keepdims=1),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["z", "probs"], ["probabilities"]),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "constant",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, n_labels])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    dest.parent.mkdir(parents=True, exist_ok=True)
    save(model, str(dest))
    return dest


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def info_for(path: Path, sequence: int, version: str, vecs: list[Any] | None = None
             ) -> ModelInfo:
    """What a verified manifest would say about ``path``."""
    return ModelInfo(sequence, version, digest(path), path.stat().st_size, vecs or [])
