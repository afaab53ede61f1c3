"""POST /v1/rerank through the real server on a tiny Qwen3 model with a rank head (random
weights: the scores mean nothing, but their shape, order, batching and errors do)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures import make_tiny_llama
from tests.integration.server_fixtures import ServerProcess, start_server

pytestmark = pytest.mark.integration

QUERY = "What is the capital of France?"
DOCS = [
    "Paris is the capital and largest city of France.",
    "Bananas are yellow when they are ripe.",
    "The Eiffel Tower stands in Paris.",
    "Berlin is the capital of Germany.",
    "A recipe for pancakes: flour, eggs, milk.",
]


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("rerank") / "tiny-reranker.gguf",
        arch="qwen3",
        rank_head=True,
        rerank_template="<s>Judge whether the document answers the query.\n"
        "Query: {query}\nDocument: {document}\nAnswer:",
        name="tiny-reranker",
    )


@pytest.fixture(scope="module")
def server(reranker_path: Path) -> Iterator[ServerProcess]:
    with start_server(reranker_path, "--rerank", "-np", "2", "-c", "2048", "-ub", "128") as s:
        yield s


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


def _rerank(http: httpx.Client, path: str = "/v1/rerank", **body: object) -> httpx.Response:
    return http.post(path, json={"query": QUERY, "documents": DOCS, **body})


def test_rerank_scores_every_document_best_first(http: httpx.Client) -> None:
    r = _rerank(http, model="tiny-reranker")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "tiny-reranker"
    results = body["results"]
    assert sorted(x["index"] for x in results) == list(range(len(DOCS)))
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    # Qwen3-Reranker's head: softmax over yes/no, the score is P(yes)
    assert all(0.0 < s < 1.0 for s in scores)
    assert len(set(scores)) > 1  # the documents are told apart
    assert "document" not in results[0]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_scores_do_not_depend_on_the_batch(http: httpx.Client) -> None:
    together = {x["index"]: x["relevance_score"] for x in _rerank(http).json()["results"]}
    for i, doc in enumerate(DOCS):
        alone = http.post("/rerank", json={"query": QUERY, "documents": [doc]}).json()
        assert alone["results"][0]["index"] == 0
        assert alone["results"][0]["relevance_score"] == pytest.approx(together[i], abs=2e-3)


def test_top_n_and_return_documents(http: httpx.Client) -> None:
    full = _rerank(http).json()["results"]
    r = _rerank(http, top_n=2, return_documents=True)
    assert r.status_code == 200, r.text
    top = r.json()["results"]
    assert [x["index"] for x in top] == [x["index"] for x in full[:2]]
    assert [x["document"]["text"] for x in top] == [DOCS[x["index"]] for x in top]
    assert _rerank(http, top_n=0).json()["results"] == []
    assert len(_rerank(http, top_n=100).json()["results"]) == len(DOCS)


def test_documents_as_objects_and_tei_texts(http: httpx.Client) -> None:
    plain = {x["index"]: x["relevance_score"] for x in _rerank(http).json()["results"]}
    objs = http.post(
        "/v1/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS]}
    ).json()
    assert {x["index"]: x["relevance_score"] for x in objs["results"]} == pytest.approx(
        plain, abs=2e-3
    )
    tei = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
    assert tei.status_code == 200, tei.text
    rows = tei.json()
    assert isinstance(rows, list) and len(rows) == len(DOCS)
    assert {x["index"]: x["score"] for x in rows} == pytest.approx(plain, abs=2e-3)
    assert all(x["text"] == DOCS[x["index"]] for x in rows)


def test_many_documents_in_one_request(http: httpx.Client) -> None:
    docs = [f"document number {i} about {DOCS[i % len(DOCS)]}" for i in range(100)]
    r = http.post("/v1/rerank", json={"query": QUERY, "documents": docs, "top_n": 3})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": QUERY, "documents": ["fine", "word " * 400]}, "documents"),
        ({"query": QUERY, "documents": []}, "documents"),
        ({"query": QUERY}, "documents"),
        ({"query": QUERY, "documents": DOCS, "texts": DOCS}, "documents"),
        ({"query": "", "documents": DOCS}, "query"),
        ({"documents": DOCS}, None),
        ({"query": QUERY, "documents": [1, 2]}, None),
        ({"query": QUERY, "documents": DOCS, "top_n": -1}, None),
    ],
)
def test_bad_requests_are_400s(http: httpx.Client, body: dict[str, object], param: str) -> None:
    r = http.post("/v1/rerank", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    assert _rerank(http).status_code == 200  # still serving


def test_an_over_long_document_is_named(http: httpx.Client) -> None:
    r = http.post("/v1/rerank", json={"query": QUERY, "documents": ["ok", "ok", "word " * 400]})
    assert r.status_code == 400
    assert "documents[2]" in r.json()["error"]["message"]


def test_embeddings_on_a_reranker_say_so(http: httpx.Client) -> None:
    r = http.post("/v1/embeddings", json={"input": "hello"})
    assert r.status_code == 501, r.text
    assert "rerank" in r.json()["error"]["message"]


def test_a_server_without_rerank_says_so(tiny_server: ServerProcess) -> None:
    with tiny_server.http() as client:
        r = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
    assert r.status_code == 501, r.text
    assert "--rerank" in r.json()["error"]["message"]
