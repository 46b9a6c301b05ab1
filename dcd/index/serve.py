"""``dcd serve INDEX``: a search page and a JSON API over an index, for people to look at what a student retrieves.

One page (:mod:`dcd.index.page`): a caption returns a grid of image thumbnails, an uploaded image returns
captions; with ``--rerank teacher|fusion`` the dual student's ranking is shown beside the re-ranked one, with each
stage's time per query. ``/api/search`` answers the same as JSON (``?q=...`` for a caption, a POSTed image file
for an image). Images are served only by item id from the index's own item list (``/image/<id>``), never by a
path from the request. Bad input gets a message and a 4xx, never a stack trace; an index that does not load
stops the server at start with a one-line error. Bound to 127.0.0.1 unless ``--host`` says otherwise.
"""

import io
import logging
import time
from typing import Any, Dict, Optional

from PIL import Image

from ..data import DataError
from .page import render_page, thumbnail_bytes
from .search import Index

__all__ = ["Searcher", "create_app", "MAX_QUERY_CHARS", "MAX_UPLOAD_BYTES", "MAX_K"]

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 500
MAX_UPLOAD_BYTES = 10 << 20
MAX_K = 100


class BadQuery(ValueError):
    """A query the page refuses (empty, too long, an unreadable or oversized upload); ``status`` is its HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Searcher:
    """An index, its optional re-ranker, and the checks every query goes through before it reaches them."""

    def __init__(self, index: Index, reranker=None, rerank_name: Optional[str] = None, rerank_k: int = 50):
        self.index, self.reranker, self.rerank_name, self.rerank_k = index, reranker, rerank_name, rerank_k

    def query(self, query, k: int) -> Dict[str, Any]:
        """``{"dual", "reranked", "timing"}`` for a caption (str) or an image (PIL); raises :class:`BadQuery`."""
        if not 1 <= k <= MAX_K:
            raise BadQuery(f"k must be between 1 and {MAX_K}, got {k}")
        if isinstance(query, str):
            query = query.strip()
            if not query:
                raise BadQuery("empty query: type a caption, or upload an image")
            if len(query) > MAX_QUERY_CHARS:
                raise BadQuery(f"query of {len(query)} characters: at most {MAX_QUERY_CHARS}")
        try:
            started = time.perf_counter()
            dual = self.index.search(query, k=k)
            dual_ms = 1000 * (time.perf_counter() - started)
            reranked, rerank_ms = None, None
            if self.reranker is not None:
                started = time.perf_counter()
                reranked = self.index.search(query, k=k, rerank=self.reranker, rerank_k=max(k, self.rerank_k),
                                             rerank_name=self.rerank_name)
                rerank_ms = max(0.0, 1000 * (time.perf_counter() - started) - dual_ms)
        except DataError as err:  # SearchError: a modality the index lacks, a query it cannot encode
            raise BadQuery(str(err)) from None
        return {"query": dual.query, "dual": dual.to_dict(), "reranked": reranked.to_dict() if reranked else None,
                "timing": {"dual_ms": round(dual_ms, 2), "rerank_ms": round(rerank_ms, 2) if rerank_ms is not None
                           else None}}

    def image_path(self, item_id: int) -> str:
        """The file of image ``item_id`` of the index (404 when the index has no such image)."""
        if "images" not in self.index.modalities:
            raise BadQuery("this index holds no images", 404)
        items = self.index.items("images")
        if not 0 <= item_id < len(items):
            raise BadQuery(f"no image {item_id} in this index (it holds {len(items)})", 404)
        return items[item_id]["path"]


def read_upload(data: bytes) -> Image.Image:
    """The uploaded image, decoded (:class:`BadQuery` when it is too large or not an image)."""
    from ..data.images import to_rgb

    if len(data) > MAX_UPLOAD_BYTES:
        raise BadQuery(f"upload of {len(data):,} bytes: at most {MAX_UPLOAD_BYTES:,}", 413)
    if not data:
        raise BadQuery("empty upload: choose an image file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadQuery(f"the upload is not an image this page can read ({type(err).__name__}: {err})") from None


def create_app(searcher: Searcher, title: str = "dcd search"):
    """The FastAPI application over ``searcher``."""
    from fastapi import FastAPI, File, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    label = searcher.rerank_name

    def page(status: int = 200, **kwargs) -> HTMLResponse:
        return HTMLResponse(render_page(title, reranker=label, **kwargs), status_code=status)

    @app.exception_handler(BadQuery)
    async def bad_query(request: Request, err: BadQuery):
        if request.url.path.startswith("/api/") or request.url.path.startswith("/image/"):
            return JSONResponse({"error": str(err)}, status_code=err.status)
        return page(err.status, error=str(err))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # never a stack trace on the page
        log.exception("dcd serve: %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(err).__name__}); see the server log"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def home(q: Optional[str] = None, k: int = 12, both: int = 0):
        if q is None:
            return page(k=k, both=True)
        return page(query=q, results=searcher.query(q, k), k=k, both=bool(both))

    @app.post("/", response_class=HTMLResponse)
    async def by_image(image: UploadFile = File(...), k: int = 12):
        results = searcher.query(read_upload(await image.read(MAX_UPLOAD_BYTES + 1)), k)
        return page(query=f"image {image.filename}", results=results, k=k)

    @app.get("/api/search")
    def api_text(q: str = "", k: int = 10):
        return searcher.query(q, k)

    @app.post("/api/search")
    async def api_image(image: UploadFile = File(...), k: int = 10):
        return searcher.query(read_upload(await image.read(MAX_UPLOAD_BYTES + 1)), k)

    @app.get("/image/{item_id}")
    def image(item_id: int):
        path = searcher.image_path(item_id)
        try:
            return Response(thumbnail_bytes(path), media_type="image/jpeg",
                            headers={"Cache-Control": "max-age=3600"})
        except DataError as err:
            raise BadQuery(f"image {item_id} cannot be read: {err}", 404) from None

    return app
