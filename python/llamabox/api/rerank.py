"""POST /v1/rerank (also /rerank, /v1/reranking, /reranking): documents scored against a query.

The Jina/Cohere shape (``query``, ``documents`` as strings or ``{"text": ...}`` objects,
``top_n``, ``return_documents``) answers ``{"results": [{"index", "relevance_score",
"document"?}], "usage"}``, sorted best first; a body with ``texts`` instead of ``documents`` is
Hugging Face TEI's and answers its bare list of ``{"index", "score", "text"?}``. Scores are
the model's rank head output (a logit: higher is more relevant), as llama.cpp's server returns
them. It needs a server started with ``--rerank`` on a model with a rank head (a cross-encoder
or a Qwen3-Reranker GGUF); a document longer than the embedding batch (``--ubatch-size``) is a
400 naming it.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from llamabox.api.errors import APIError
from llamabox.api.http import Request, Response, Route, json_response
from llamabox.api.state import AppState
from llamabox.types import InvalidRequestError

MAX_DOCUMENTS = 10_000


class DocumentObject(Struct, kw_only=True):
    text: str


class RerankRequest(Struct, kw_only=True):
    query: str
    documents: list[str | DocumentObject] | None = None
    texts: list[str] | None = None  # TEI's name for the documents (and its answer's shape)
    model: str | None = None
    top_n: Annotated[int, Meta(ge=0)] | None = None  # default: all
    return_documents: bool = False  # Jina/Cohere: each result carries its document
    return_text: bool = False  # TEI: each result carries its text


class RerankDocument(Struct):
    text: str


class RerankResult(Struct, kw_only=True, omit_defaults=True):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(Struct, kw_only=True):
    model: str
    results: list[RerankResult]
    usage: RerankUsage
    object: str = "list"


class TeiResult(Struct, kw_only=True, omit_defaults=True):
    index: int
    score: float
    text: str | None = None


_decoder = msgspec.json.Decoder(RerankRequest)


async def rerank(req: Request, state: AppState) -> Response:
    body = req.decode(_decoder)
    if (body.documents is None) == (body.texts is None):
        raise InvalidRequestError(
            "give the documents as `documents` (or TEI's `texts`)", "documents"
        )
    tei = body.texts is not None
    param = "texts" if tei else "documents"
    docs = body.texts if body.texts is not None else body.documents or []
    texts = [d if isinstance(d, str) else d.text for d in docs]
    if not texts:
        raise InvalidRequestError(f"{param} is empty", param)
    if len(texts) > MAX_DOCUMENTS:
        raise InvalidRequestError(f"{len(texts)} documents, more than {MAX_DOCUMENTS}", param)
    if not body.query:
        raise InvalidRequestError("query is empty", "query")
    state = await state.use_model(body.model)
    if not state.config.engine.rerank:
        raise APIError(
            501, "This server does not rerank. Start it with `--rerank` on a reranking model"
        )
    scored = await state.engine.rerank(body.query, texts)
    order = sorted(range(len(scored)), key=lambda i: scored[i].score, reverse=True)
    if body.top_n is not None:
        order = order[: body.top_n]
    n_tokens = sum(r.prompt_tokens for r in scored)
    if tei:
        return json_response(
            [
                TeiResult(
                    index=i, score=scored[i].score, text=texts[i] if body.return_text else None
                )
                for i in order
            ]
        )
    results = [
        RerankResult(
            index=i,
            relevance_score=scored[i].score,
            document=RerankDocument(texts[i]) if body.return_documents else None,
        )
        for i in order
    ]
    return json_response(
        RerankResponse(
            model=state.model_name, results=results, usage=RerankUsage(n_tokens, n_tokens)
        )
    )


def routes() -> list[Route[AppState]]:
    return [
        Route("POST", path, rerank, generates=True, picks_model=True)
        for path in ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking")
    ]
