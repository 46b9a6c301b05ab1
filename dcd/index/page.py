"""The results page: a query box and a grid of hits, the same for ``dcd serve`` and ``dcd search --html``.

Retrieval is judged by looking, so a text query returns image thumbnails (rank, score, id) and an image query
returns captions. With a re-ranker the dual student's own ranking can be shown beside the re-ranked one, each
with its time per query. The page is rendered on the server (a plain HTML form, no script), so it works the
same served live or saved as a file; ``thumbnail`` decides where an image comes from (``/image/<id>`` when
served, an inline ``data:`` URI in a saved page).
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any, Callable, Dict, Optional

from PIL import Image

from ..data import load_image

__all__ = ["render_page", "thumbnail_bytes", "inline_thumbnail", "THUMBNAIL_PX"]

#: the longest side of a thumbnail on the page
THUMBNAIL_PX = 192

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
form { display: flex; gap: .5rem; flex-wrap: wrap; align-items: center; margin-bottom: 1rem; }
input[type=text] { flex: 1 1 28rem; font-size: 1.1rem; padding: .4rem; }
.columns { display: flex; gap: 2rem; flex-wrap: wrap; }
.column { flex: 1 1 24rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: .75rem; }
.hit { border: 1px solid #ddd; border-radius: 6px; padding: .4rem; background: #fafafa; }
.hit img { width: 100%; height: 180px; object-fit: contain; background: #fff; }
.meta { font-size: .85rem; color: #555; }
.caption { font-size: 1rem; }
.error { color: #a00; font-weight: 600; }
.timing { color: #555; font-size: .9rem; }
"""


def thumbnail_bytes(path: str) -> bytes:
    """A JPEG thumbnail of the image at ``path`` (longest side :data:`THUMBNAIL_PX`)."""
    image = load_image(path)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def inline_thumbnail(item: Dict[str, Any], item_id: int) -> str:
    """A ``data:`` URI of the item's thumbnail: a saved page needs no server and no image files beside it."""
    return "data:image/jpeg;base64," + base64.b64encode(thumbnail_bytes(item["path"])).decode()


def _grid(title: str, result: Dict[str, Any], thumbnail: Callable[[Dict[str, Any], int], str], ms: Optional[float]
          ) -> str:
    timing = f' <span class="timing">{ms:.1f} ms</span>' if ms is not None else ""
    cells = []
    for hit in result["hits"]:
        item, score = hit["item"], hit["score"]
        shown = "-" if score is None else f"{score:.3f}"
        meta = f'<div class="meta">#{hit["rank"]} · score {shown} · id {hit["id"]}</div>'
        if "path" in item:
            body = f'<img alt="{html.escape(str(item["path"]))}" src="{html.escape(thumbnail(item, hit["id"]))}">'
        else:
            body = f'<div class="caption">{html.escape(str(item.get("caption", "")))}</div>'
        cells.append(f'<div class="hit" data-id="{hit["id"]}" data-rank="{hit["rank"]}">{body}{meta}</div>')
    return (f'<div class="column"><h2>{html.escape(title)}{timing}</h2>'
            f'<div class="grid">{"".join(cells)}</div></div>')


def render_page(title: str, query: str = "", results: Optional[Dict[str, Any]] = None, error: Optional[str] = None,
                thumbnail: Callable[[Dict[str, Any], int], str] = lambda item, i: f"/image/{i}",
                live: bool = True, reranker: Optional[str] = None, both: bool = True, k: int = 12) -> str:
    """The whole page. ``results``: ``{"dual": hits, "reranked": hits or None, "timing": {"dual_ms", "rerank_ms"}}``
    (hits as :meth:`dcd.index.search.Hits.to_dict` gives them); ``live``: with the query form (a served page)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if live:
        rerank_box = (f'<label><input type="checkbox" name="both" value="1"{" checked" if both else ""}> show the dual '
                      f"student's ranking beside {html.escape(reranker)}'s</label>") if reranker else ""
        parts.append(
            '<form method="get" action="/" id="text-search">'
            f'<input type="text" name="q" id="q" placeholder="a caption: what should the image show?" '
            f'value="{html.escape(query)}" autofocus>'
            f'<input type="number" name="k" min="1" max="100" value="{k}" title="results">'
            f'{rerank_box}<button type="submit">Search</button></form>'
            '<form method="post" action="/" enctype="multipart/form-data" id="image-search">'
            '<input type="file" name="image" accept="image/*"> <button type="submit">Captions for this image</button>'
            "</form>")
    elif query:
        parts.append(f"<p>query: <b>{html.escape(query)}</b></p>")
    if error:
        parts.append(f'<p class="error" id="error">{html.escape(error)}</p>')
    if results:
        timing = results.get("timing", {})
        columns = []
        reranked = results.get("reranked")
        if reranked is not None:
            columns.append(_grid(f"re-ranked by {reranked.get('reranked_by')}", reranked, thumbnail,
                                 timing.get("rerank_ms")))
        if reranked is None or both:
            columns.append(_grid("dual student", results["dual"], thumbnail, timing.get("dual_ms")))
        parts.append(f'<div class="columns" id="results">{"".join(columns)}</div>')
    parts.append("</body></html>")
    return "".join(parts)
