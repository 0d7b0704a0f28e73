"""The test vectors published in docs/crypto.md still re-derive and verify."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from rapidmq_edge.crypto.errors import CryptoError
from rapidmq_edge.crypto.vectors import check, extract

DOC = Path(__file__).resolve().parents[1] / "docs" / "crypto.md"


def test_documented_vectors_verify() -> None:
    vectors = extract(DOC.read_text())
    check(vectors)
    assert len(vectors["messages"]) == 3


@pytest.mark.parametrize(
    ("path", "index"),
    [
        (("session", "header"), 700),
        (("batch", "signed"), 3000),
        (("messages", 1, "envelope"), 30),
        (("device", "envelope"), 20),
        (("session", "key"), 3),
    ],
)
def test_a_changed_vector_fails(path: tuple[object, ...], index: int) -> None:
    vectors = copy.deepcopy(extract(DOC.read_text()))
    node = vectors
    for p in path[:-1]:
        node = node[p]  # type: ignore[index]
    value = node[path[-1]]  # type: ignore[index]
    node[path[-1]] = value[:index] + ("0" if value[index] != "0" else "1") + value[index + 1 :]  # type: ignore[index]
    with pytest.raises((AssertionError, CryptoError)):
        check(vectors)
