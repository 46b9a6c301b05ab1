"""Deploying a dual student: encode a corpus once into a FAISS index on disk, then search it in milliseconds.

Modules, one job each:

* :mod:`~dcd.index.corpus`   -- what is indexed (image folder, caption file, a split's images / captions);
* :mod:`~dcd.index.encode`   -- resumable, rank-sharded chunked encoding and the merge;
* :mod:`~dcd.index.ann`      -- which FAISS index (flat / HNSW / IVF-PQ), built and searched how;
* :mod:`~dcd.index.store`    -- the index directory format;
* :mod:`~dcd.index.identity` -- the student's identity, and refusing queries from another student;
* :mod:`~dcd.index.rerank`   -- re-scoring candidates with a cross-encoder;
* :mod:`~dcd.index.search`   -- :class:`Index` (``build``, ``load``, ``search``);
* :mod:`~dcd.index.commands` -- ``dcd index`` / ``dcd search``.
"""
from .ann import AnnParams
from .corpus import Corpus, caption_file, image_folder, split_corpora
from .identity import StudentMismatch
from .search import Hits, Index, SearchError

__all__ = ["AnnParams", "Corpus", "Hits", "Index", "SearchError", "StudentMismatch", "caption_file", "image_folder",
           "split_corpora"]
