"""What the calls return: plain dataclasses and enums, no protobuf types.

Callers should not need the generated stubs to read an answer, and the
stubs can change with the generator; these types are the stable surface.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import numpy as np
import numpy.typing as npt

__all__ = ["Source", "ModelKind", "LookupResult", "Neighbour", "SimilarResult", "ModelInfo"]


class Source(enum.IntEnum):
    """Where a Lookup row came from (the values of ``embark.v1.Source``).

    An ``IntEnum``, so ``result.sources == Source.STORE`` compares a whole
    array at once.
    """

    SOURCE_UNSPECIFIED = 0
    #: The server's in-process tier.
    CACHE = 1
    #: The persistent store.
    STORE = 2
    #: Unknown key: the row is the model's OOV vector; the key is queued and
    #: a later Lookup gets the real vector.
    OOV_PENDING = 3
    #: The input cannot be embedded (bad URL, not an image...): OOV row; not
    #: queued again until its failure record expires.
    OOV_FAILED = 4
    #: The store did not answer in time: OOV row, NOT queued; ask again.
    OOV_UNAVAILABLE = 5


class ModelKind(enum.IntEnum):
    """What a model embeds (``embark.v1.ModelKind``)."""

    MODEL_KIND_UNSPECIFIED = 0
    IMAGE = 1
    TEXT = 2


_REAL = (Source.CACHE, Source.STORE)
_ASK_AGAIN = (Source.OOV_PENDING, Source.OOV_UNAVAILABLE)


def _source_name(code: int) -> str:
    try:
        return Source(code).name
    except ValueError:
        return str(code)


# eq=False: a generated __eq__ would compare arrays elementwise and fail
# on truth testing; compare the fields with numpy instead.
@dataclass(frozen=True, eq=False)
class LookupResult:
    """The answer to a Lookup, one row per key in request order.

    ``matrix`` is float32 (float16 for ``dtype="f16"``), shape
    ``(len(keys), dim)``. When the keys fit in
    one batch it is a zero-copy, READ-ONLY view over the bytes of the
    server's answer (``numpy.frombuffer``): writing to it raises
    ``ValueError``; call ``matrix.copy()`` for a writable array. When the
    keys were split into several batches it is one contiguous array that
    owns its memory (the batches had to be copied into it).

    ``sources`` holds a :class:`Source` code per row (``numpy.int32``);
    ``mask`` is True where the row is a real vector (CACHE or STORE) and
    False where it is the model's OOV row, ready to use as a feature.
    ``version`` is the model version every row belongs to.
    """

    matrix: npt.NDArray[np.float32]
    sources: npt.NDArray[np.int32]
    mask: npt.NDArray[np.bool_]
    dim: int
    version: str = ""

    @classmethod
    def of(
        cls, matrix: npt.NDArray[np.float32], sources: npt.NDArray[np.int32], version: str = ""
    ) -> "LookupResult":
        """A result with ``mask`` derived from ``sources``."""
        return cls(
            matrix=matrix, sources=sources, mask=np.isin(sources, _REAL), dim=int(matrix.shape[1]), version=version
        )

    @property
    def pending(self) -> npt.NDArray[np.bool_]:
        """True where asking again later may give a real vector
        (OOV_PENDING, OOV_UNAVAILABLE); OOV_FAILED rows will not change."""
        return np.isin(self.sources, _ASK_AGAIN)

    def source_names(self) -> list[str]:
        """The sources as names (``"CACHE"``...), e.g. for logs; a code this
        client does not know (a newer server) is shown as its number."""
        return [_source_name(int(s)) for s in self.sources]

    def __len__(self) -> int:
        return int(self.matrix.shape[0])


class Neighbour(NamedTuple):
    """One answer of Similar: a stored key and its cosine score."""

    key: str
    score: float


@dataclass(frozen=True)
class SimilarResult:
    """Similar's neighbours, best first, and whether the search was exact
    (below the server's ``--similar-exact-below``) or approximate (HNSW).

    Iterating gives ``(key, score)`` pairs. Keys over 256 bytes come back as
    their stored hash (``h256:<sha256 hex>``).
    """

    neighbours: list[Neighbour]
    exact: bool

    def __iter__(self) -> Iterator[Neighbour]:
        return iter(self.neighbours)

    def __len__(self) -> int:
        return len(self.neighbours)

    def __getitem__(self, index: int) -> Neighbour:
        return self.neighbours[index]


@dataclass(frozen=True)
class ModelInfo:
    """A model version the server serves (one entry per version).
    ``version`` changes whenever the model's output for the same input
    changes; ``current`` says whether a lookup without ``version=`` gets
    it; ``stored_vectors`` is its coverage as the server last counted it
    (``None``: not counted yet)."""

    name: str
    dim: int
    kind: ModelKind
    version: str
    current: bool = True
    stored_vectors: Optional[int] = None
