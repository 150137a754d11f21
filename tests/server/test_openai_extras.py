"""``GET /v1/models/{model}`` and the validation of ``POST /v1/embeddings``, through a real
server in front of the fake OpenAI upstream, on SQLite and PostgreSQL.

A model retrieved by id is the very object ``GET /v1/models`` lists for it, whether the
SDK sends the id's ``/`` as ``%2F`` or a raw client sends it as is. An embeddings request
of the wrong shape is an OpenAI 400 naming the parameter, never reaches the upstream and
leaves no request-log row; a well-formed one reaches the upstream byte for byte, unknown
fields included.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, write_config

MASTER = "parley-master-extras-key"
EMBEDDER = "up/text-embedding-3-small"


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _config(tmp_path: Path, upstream: FakeOpenAI) -> None:
    write_config(
        tmp_path,
        [
            {
                "name": "up",
                "kind": "openai",
                "base_url": upstream.base_url,
                "models": ["gpt-4o-mini", "text-embedding-3-small"],
            }
        ],
        aliases={"fast": ["up/gpt-4o-mini"]},
    )


@pytest.fixture
def server(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[ParleyServer]:
    _config(tmp_path, upstream)
    with ParleyServer(settings_for(tmp_path, database_url)) as running:
        yield running


@pytest.fixture
def sdk(server: ParleyServer) -> Iterator[openai.OpenAI]:
    with _sdk(server) as client:
        yield client


def _sdk(server: ParleyServer, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def _listed(server: ParleyServer) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{server.base_url}/models", timeout=10)
    assert response.status_code == 200
    return {m["id"]: m for m in response.json()["data"]}


# A configured model, one only the upstream's own list names, and an alias (no slash).
@pytest.mark.parametrize("model", ["up/gpt-4o-mini", "up/tool-call", "fast"])
def test_a_model_is_retrieved_as_the_list_shows_it(
    server: ParleyServer, sdk: openai.OpenAI, model: str
) -> None:
    listed = _listed(server)[model]
    retrieved = sdk.models.retrieve(model)
    assert retrieved.model_dump(exclude_unset=True) == listed
    # A raw client that does not percent-encode the slash gets the same object.
    raw = httpx.get(f"{server.base_url}/models/{model}", timeout=10)
    assert raw.status_code == 200 and raw.json() == listed


@pytest.mark.parametrize("model", ["up/no-such-model", "nope/gpt-4o-mini", "slow"])
def test_an_unlisted_model_is_an_openai_404(
    server: ParleyServer, sdk: openai.OpenAI, model: str
) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.models.retrieve(model)
    assert raised.value.code == "model_not_found"
    raw = httpx.get(f"{server.base_url}/models/{model}", timeout=10)
    assert raw.status_code == 404
    assert raw.json() == {
        "error": {
            "message": f"The model '{model}' does not exist",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }


def test_retrieving_a_model_needs_the_key_listing_does(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    _config(tmp_path, upstream)
    settings = settings_for(tmp_path, database_url, PARLEY_MASTER_KEY=MASTER)
    with ParleyServer(settings) as server:
        for path in ("/models", "/models/up/gpt-4o-mini", "/models/fast"):
            missing = httpx.get(f"{server.base_url}{path}", timeout=10)
            assert missing.status_code == 401, path
            assert missing.json()["error"]["code"] == "invalid_api_key"
        with _sdk(server, "wrong") as wrong, pytest.raises(openai.AuthenticationError):
            wrong.models.retrieve("up/gpt-4o-mini")
        with _sdk(server, MASTER) as master:
            assert master.models.retrieve("up/gpt-4o-mini").id == "up/gpt-4o-mini"


def _embed(server: ParleyServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/embeddings", json=body, timeout=10)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": "  "}, "model"),
        ({"input": ""}, "input"),
        # OpenAI refuses an empty string inside the array too.
        ({"input": [""]}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": [{"a": 1}]}, "input"),
        ({"input": [True, False]}, "input"),
        ({"input": [1, "a"]}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [[1, 2], 3]}, "input"),
        ({"input": [["a"]]}, "input"),
        ({"input": [[1, True]]}, "input"),
        ({"dimensions": "a"}, "dimensions"),
        ({"dimensions": 0}, "dimensions"),
        ({"dimensions": 1.5}, "dimensions"),
        ({"dimensions": True}, "dimensions"),
        ({"encoding_format": "hex"}, "encoding_format"),
        ({"encoding_format": 1}, "encoding_format"),
        ({"encoding_format": ["float"]}, "encoding_format"),
        ({"encoding_format": {"float": True}}, "encoding_format"),
        ({"user": 5}, "user"),
    ],
)
def test_wrong_embeddings_types_are_an_unrecorded_400(
    server: ParleyServer,
    database_url: str,
    upstream: FakeOpenAI,
    fields: dict[str, Any],
    param: str,
) -> None:
    response = _embed(server, {"model": EMBEDDER, "input": "x", **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert f"'{param}'" in error["message"]
    assert [r for r in upstream.received if r[0] == "/v1/embeddings"] == []
    assert rows(database_url, "SELECT id FROM request_log") == []


def test_the_sdk_gets_a_bad_request_error_for_a_wrong_type(
    sdk: openai.OpenAI, database_url: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.embeddings.create(model=EMBEDDER, input="x", dimensions="a")  # type: ignore[arg-type]
    assert raised.value.status_code == 400
    assert raised.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.embeddings.create(model=EMBEDDER, input=[{"a": 1}])  # type: ignore[arg-type]
    assert raised.value.param == "input"
    assert rows(database_url, "SELECT id FROM request_log") == []


def test_only_well_formed_embeddings_reach_the_upstream_untouched(
    server: ParleyServer, database_url: str, upstream: FakeOpenAI
) -> None:
    refused = _embed(server, {"model": EMBEDDER, "input": [{"a": 1}], "dimensions": "a"})
    assert refused.status_code == 400
    accepted: list[dict[str, Any]] = [
        {"model": EMBEDDER, "input": "one text", "encoding_format": "float", "user": "u1"},
        {"model": EMBEDDER, "input": ["a", "b c"], "dimensions": 3},
        {"model": EMBEDDER, "input": [1, 2, 3], "encoding_format": "base64"},
        # Fields parley does not model go through as they came.
        {"model": EMBEDDER, "input": [[1, 2], [3]], "vendor_option": {"keep": [1, None]}},
    ]
    for body in accepted:
        response = _embed(server, body)
        assert response.status_code == 200, response.text
    sent = [r[2] for r in upstream.received if r[0] == "/v1/embeddings"]
    assert sent == [{**body, "model": "text-embedding-3-small"} for body in accepted]
    logged = rows(database_url, "SELECT endpoint, success FROM request_log")
    assert logged == [{"endpoint": "embeddings", "success": True}] * len(accepted)
