"""``dcd index`` and ``dcd search``: their options and what they run (``dcd/cli.py`` adds and dispatches them).

Bad input (a missing folder or index, an empty query, a student that did not build the index, a bad
option value) raises a ``ValueError`` (``DataError``) or ``OSError`` naming it, which ``dcd.cli.main``
turns into one line, ``dcd: error: ...``, and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Tuple

from ..stages import student_dir
from .ann import INDEX_TYPES, AnnParams

__all__ = ["add_index_parser", "add_search_parser", "run"]

_DEFAULTS = AnnParams()


def add_index_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "index", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="encode a corpus with a dual student into a FAISS index directory",
        description="Encode images and / or captions with a trained dual student and write an index directory "
                    "(vectors, FAISS index, id -> path/caption table, the student's identity). Resumable: a killed "
                    "run continues at the next unwritten chunk. Under torchrun every rank encodes its share.")
    p.add_argument("out", metavar="INDEX", help="index directory to write (new, empty, or one dcd index wrote before)")
    p.add_argument("--student", required=True,
                   help="the dual student: a save_pretrained directory, its stage folder, or a run folder (e.g. "
                        "runs/meter-synthetic: the DCD dual student of its last run)")
    g = p.add_argument_group("what to index (an image folder and / or a caption file, or a split)")
    g.add_argument("--images", metavar="FOLDER", help="image folder, searched recursively for jpg / png / webp")
    g.add_argument("--captions", metavar="FILE", help="captions: .jsonl (objects with a 'caption' field, other fields "
                   "kept) or text (one caption per line)")
    g.add_argument("--data", help="a split instead: synthetic | coco | flickr30k | a Karpathy / COCO json")
    g.add_argument("--data-root", help="folder of --data (see dcd distill)")
    g.add_argument("--split", default="test", help="which split of --data")
    g.add_argument("--modality", default="both", choices=("both", "images", "texts"), help="what of --data to index")
    a = p.add_argument_group("FAISS index (auto: exact up to --flat-max vectors, HNSW up to --hnsw-max, IVF-PQ above)")
    a.add_argument("--index-type", default=_DEFAULTS.index_type, choices=INDEX_TYPES, help="kind of index")
    a.add_argument("--flat-max", type=int, default=_DEFAULTS.flat_max, help="auto: exact search up to this many items")
    a.add_argument("--hnsw-max", type=int, default=_DEFAULTS.hnsw_max, help="auto: HNSW up to this many items")
    a.add_argument("--hnsw-m", type=int, default=_DEFAULTS.hnsw_m, help="HNSW: graph links per node (M)")
    a.add_argument("--ef-construction", type=int, default=_DEFAULTS.ef_construction, help="HNSW: build beam width")
    a.add_argument("--ef-search", type=int, default=_DEFAULTS.ef_search,
                   help="HNSW: search beam width (recall against speed); dcd search can override it")
    a.add_argument("--nlist", type=int, help="IVF-PQ: k-means cells (default sqrt(n))")
    a.add_argument("--nprobe", type=int, default=_DEFAULTS.nprobe, help="IVF-PQ: cells visited per query")
    a.add_argument("--pq-bytes", type=int, help="IVF-PQ: bytes per compressed vector; divides the dimension "
                   "(default: the largest divisor of d at most d/8)")
    a.add_argument("--refine", type=int, default=_DEFAULTS.refine,
                   help="IVF-PQ: re-score this many times k candidates exactly from the stored vectors (1: off)")
    e = p.add_argument_group("encoding")
    e.add_argument("--batch-size", type=int, default=64, help="items per forward pass")
    e.add_argument("--chunk-size", type=int, default=1024, help="items per resumable chunk written to disk")
    e.add_argument("--num-workers", type=int, default=0, help="image decoding processes")
    e.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def add_search_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "search", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="query an index built by dcd index (text -> images, image -> captions)",
        description="Search an index with a caption (text -> images, or captions when the index has no images) or "
                    "with --image (image -> captions, or images). Prints ranked paths / captions with scores.")
    _opened_index_options(p)
    p.add_argument("query", nargs="?", help="the caption to search for")
    p.add_argument("--image", metavar="PATH", help="search with this image instead of a caption")
    p.add_argument("-k", "--k", dest="k", type=int, default=10, help="results to print")
    p.add_argument("--target", choices=("images", "texts"),
                   help="what to search (default: the other modality when the index has it)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--html", metavar="OUT.html", help="also write the results as a page (thumbnails inline), to share")
    s = p.add_argument_group("search knobs (default: those the index was built with)")
    s.add_argument("--ef-search", type=int, help="HNSW search beam width")
    s.add_argument("--nprobe", type=int, help="IVF-PQ cells visited")
    s.add_argument("--refine", type=int, help="IVF-PQ exact re-scoring factor")
    return p


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="a search page over an index: a caption -> image thumbnails, an image -> captions (and /api/search)",
        description="Serve a search page and a JSON API (/api/search) over an index built by dcd index. Images are "
                    "served only by their id in the index. With --rerank the dual student's ranking is shown beside "
                    "the re-ranked one, with each stage's time per query.")
    _opened_index_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    return p


def _opened_index_options(p: argparse.ArgumentParser) -> None:
    """What every command that opens an index takes: the index, its student, the device, a re-ranker."""
    p.add_argument("index", metavar="INDEX", help="index directory written by dcd index")
    p.add_argument("--student", help="the index's student (default: the directory recorded when it was built); "
                   "any other student is refused")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    _rerank_options(p)


def _rerank_options(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("re-ranking the best candidates with a cross-encoder")
    r.add_argument("--rerank", choices=("teacher", "fusion"), help="re-score the top --rerank-k candidates")
    r.add_argument("--rerank-k", type=int, default=50, help="candidates re-scored per query")
    r.add_argument("--teacher", default="meter", help="--rerank teacher: teacher family")
    r.add_argument("--teacher-checkpoint", help="--rerank teacher: checkpoint (default: the embedded teacher "
                   "trained by dcd teacher / make distill on --data)")
    r.add_argument("--data", default="synthetic", help="--rerank teacher without a checkpoint: whose embedded teacher")
    r.add_argument("--data-root", help="folder of --data")
    r.add_argument("--reranker", metavar="DIR", help="--rerank fusion: the saved fusion student")


# ------------------------------------------------------------------------------------------- running
def run(args: argparse.Namespace) -> int:
    """Run ``dcd index`` / ``dcd search`` / ``dcd serve``."""
    return {"index": _index, "search": _search, "serve": _serve}[args.command](args)


def _index(args: argparse.Namespace) -> int:
    from ..runtime import distributed_info, init_distributed, shutdown_distributed
    from .corpus import load_corpora
    from .search import Index

    corpora = load_corpora(args.images, args.captions, args.data, args.data_root, args.split, args.modality)
    params = AnnParams(index_type=args.index_type, flat_max=args.flat_max, hnsw_max=args.hnsw_max, hnsw_m=args.hnsw_m,
                       ef_construction=args.ef_construction, ef_search=args.ef_search, nlist=args.nlist,
                       nprobe=args.nprobe, pq_bytes=args.pq_bytes, refine=args.refine)
    device = init_distributed(args.device)
    index = Index.build(student_dir(args.student), corpora, args.out, params, chunk_size=args.chunk_size,
                        batch_size=args.batch_size, device=device, num_workers=args.num_workers,
                        progress=args.progress)
    if distributed_info()[0] == 0:
        print(index.summary())
    shutdown_distributed()
    return 0


def _search(args: argparse.Namespace) -> int:
    from .search import Index, SearchError

    if args.image is not None and args.query is not None:
        raise SearchError("give a caption or --image PATH, not both")
    if args.image is None and (args.query is None or not args.query.strip()):
        raise SearchError("empty query: give a caption, or an image with --image PATH")
    index = Index.load(args.index, student_dir(args.student) if args.student else None, args.device)
    reranker, name = _reranker(args)
    query = Path(args.image) if args.image is not None else args.query
    hits = index.search(query, k=args.k, target=args.target, rerank=reranker, rerank_k=args.rerank_k,
                        rerank_name=name, ef_search=args.ef_search, nprobe=args.nprobe, refine=args.refine)
    if args.html:
        _write_page(args, index, hits, name)
    if args.json:
        print(json.dumps(hits.to_dict(), indent=1))
        return 0
    source = "image" if args.image is not None else "text"
    how = f", re-ranked by {name}" if name else ""
    print(f"{source} -> {hits.target} ({index.meta['modalities'][hits.target]['index']['type']} index of "
          f"{index.meta['modalities'][hits.target]['count']}{how}): {hits.query}")
    for rank, (score, item) in enumerate(zip(hits.scores, hits.items), 1):
        shown = "     -" if score is None else f"{score:7.4f}"
        print(f"{rank:>4}  {shown}  {item.get('path') or item.get('caption')}")
    sys.stdout.flush()
    return 0


def _write_page(args: argparse.Namespace, index, hits, name: Optional[str]) -> None:
    """``dcd search --html``: the results grid as one self-contained page (thumbnails inline)."""
    from teachers.files import write_text

    from .page import inline_thumbnail, render_page

    dual = hits.to_dict()
    if name:  # the dual student's own ranking beside the re-ranked one, as the served page shows it
        dual = index.search(Path(args.image) if args.image is not None else args.query, k=args.k).to_dict()
    results = {"dual": dual, "reranked": hits.to_dict() if name else None, "timing": {}}
    query = args.query if args.image is None else f"image {args.image}"
    write_text(args.html, render_page(f"dcd search: {index.path}", query=query, results=results,
                                      thumbnail=inline_thumbnail, live=False))
    print(f"written: {args.html}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    from .search import Index
    from .serve import Searcher, create_app

    try:
        import uvicorn
    except ImportError as err:
        raise SystemExit(f"dcd: error: dcd serve needs fastapi and uvicorn ({err}): pip install fastapi uvicorn "
                         "python-multipart") from None
    index = Index.load(args.index, student_dir(args.student) if args.student else None, args.device)
    reranker, name = _reranker(args)
    app = create_app(Searcher(index, reranker, name, args.rerank_k), title=f"dcd search: {args.index}")
    print(f"dcd serve: {index.summary().splitlines()[0]}\n  http://{args.host}:{args.port}/  (Ctrl-C stops)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _reranker(args: argparse.Namespace) -> Tuple[Optional[object], Optional[str]]:
    """The cross-encoder ``--rerank`` names (and a label for it), or ``(None, None)``."""
    from .search import SearchError

    if args.rerank is None:
        if args.reranker or args.teacher_checkpoint:
            raise SearchError("--reranker / --teacher-checkpoint need --rerank fusion / --rerank teacher")
        return None, None
    if args.rerank == "fusion":
        if not args.reranker:
            raise SearchError("--rerank fusion needs --reranker DIR (a saved fusion student)")
        import students

        return students.load_student(student_dir(args.reranker, "fusion")).to(args.device), \
            f"fusion student {args.reranker}"
    if args.reranker:
        raise SearchError("--reranker is for --rerank fusion; --rerank teacher takes --teacher / --teacher-checkpoint")
    import teachers

    checkpoint = args.teacher_checkpoint or _require_embedded_teacher(args.teacher, args.data, args.data_root) / "model"
    return teachers.create_teacher(args.teacher, checkpoint=checkpoint).to(args.device), f"{args.teacher} teacher"


def _require_embedded_teacher(family: str, data: str, data_root: Optional[str]) -> Path:
    """Search never trains a teacher: the embedded one must be there already, made by the current recipe.
    Returns its folder."""
    from ..data import load_split
    from ..teacher_training import EMBEDDED_TEACHERS, find_embedded_teacher, teacher_dir
    from .search import SearchError

    if family not in EMBEDDED_TEACHERS:
        raise SearchError(f"--teacher {family} has no embedded recipe: pass --teacher-checkpoint")
    train = load_split(data, data_root, split="train")
    directory = find_embedded_teacher(family, train, data, data_root)
    if directory is None:
        raise SearchError(f"no {family} teacher trained on {data} by the current recipe in "
                          f"{teacher_dir(family, train, data=data, data_root=data_root).parent}: train it first (dcd teacher --teacher "
                          f"{family} --data {data}, or make distill TEACHER={family}) or pass --teacher-checkpoint")
    return directory