"""Downloads written when first asked for: a link per format of a stored result, and its route.

    <page>download/<key>/<format>            the result's file in that format (any of ``store.DOWNLOADS``)
    <page>download/<key>/<format>/<name>     the same, under its file name (what the buttons link to)

The first request for a format encodes it from the entry's source (``ResultStore.download``) and
keeps it with the entry; later ones are served from disk. The links work before the file exists,
so the page, API clients and anything that reports a result (the details panel, MCP) can hand them
out at once.

Why links, not Gradio file values: Gradio needs a file value to exist on disk when the handler
returns it (``processing_utils.move_files_to_cache``), so the files would have to be written before
the result is shown. A ``DownloadButton`` whose value is a URL downloads it with a plain link in
the browser; ``LinkDownloadButton`` hands Gradio such a URL ready-made (with ``is_stream``, the
flag that makes ``gradio_client`` fetch the URL itself instead of asking the server to proxy it,
which Gradio refuses for loopback and private addresses). The route is added to Gradio's FastAPI
app at launch (``launch(app_kwargs={"routes": download_routes(store)})``).
"""

from __future__ import annotations

import logging
import mimetypes
from dataclasses import dataclass

import gradio as gr
from gradio.data_classes import FileData
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from .store import DISK_FULL, DOWNLOADS, ResultStore

logger = logging.getLogger("triplane_turbo.app")

GONE = "This result is no longer stored (results are kept for a while, then removed). Open its link to make it again."
DISK_FULL_ANSWER = "The server's disk is full, so this file could not be written. Please try again in a few minutes."


@dataclass(frozen=True)
class DownloadLink:
    """A download that the server writes on first request: its URL and file name."""

    url: str
    name: str


def download_url(page: str, key: str, file_format: str, name: str | None = None) -> str:
    """The link to a stored result's file in ``file_format`` (``page``: the app's address, or "")."""
    url = f"{page.rstrip('/')}/download/{key}/{file_format}" if page else f"download/{key}/{file_format}"
    return f"{url}/{name}" if name else url


class LinkDownloadButton(gr.DownloadButton):
    """``gr.DownloadButton`` (the same component in the page) whose value may also be a ``DownloadLink``."""

    is_template = True  # drawn by gr.DownloadButton's frontend, as Gradio's own button variants are

    def postprocess(self, value) -> FileData | None:
        if isinstance(value, DownloadLink):
            return FileData(path=value.url, url=value.url, orig_name=value.name, is_stream=True)
        return super().postprocess(value)


def download_routes(store: ResultStore) -> list[Route]:
    """The route of the links (``download_url``) to ``store``'s results, for Gradio's FastAPI app."""

    def serve(request: Request) -> Response:  # a plain function: Starlette runs it in a worker thread
        key, file_format = request.path_params["key"], request.path_params["format"]
        if file_format not in DOWNLOADS:
            return PlainTextResponse(f"Unknown format; the formats are {', '.join(DOWNLOADS)}.", 404)
        try:
            path = store.download(key, file_format)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                logger.error("writing a download failed: %s", exc)
                return PlainTextResponse(DISK_FULL_ANSWER, 507)
            raise
        if path is None or request.path_params.get("name", path.name) != path.name:
            return PlainTextResponse(GONE, 404)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, filename=path.name)

    return [Route("/download/{key}/{format}", serve, methods=["GET", "HEAD"]),
            Route("/download/{key}/{format}/{name}", serve, methods=["GET", "HEAD"])]


__all__ = ["DownloadLink", "LinkDownloadButton", "download_routes", "download_url"]
