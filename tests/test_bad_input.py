"""Malformed requests: each gets a 4xx whose body names the field (``loc``) and the reason, and
leaves the database as it was."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.test_api import TOKEN, make_api  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(120)

VALID = {"name": "bad", "estimators": ["aqe"], "bits": [{"w": 1, "a": 1}], "epochs": 2}
MIB = 1 << 20


def spec(**over) -> dict:
    return {k: v for k, v in {**VALID, **over}.items() if v is not ...}


def nested(path: str, value) -> dict:
    """VALID with ``value`` at ``a.b`` (dict fields created as needed)."""
    body = json.loads(json.dumps(VALID))
    *parents, leaf = path.split(".")
    node = body
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return body


def case(id_, loc, reason, *, json_=None, content=None, status=422, method="post", url="/runs", headers=None,
         settings=None):
    headers = headers or {}
    if content is not None and "Content-Type" not in headers:
        headers = {**headers, "Content-Type": "application/json"}
    request = {"method": method, "url": url, "headers": headers}
    if json_ is not None:
        request["json"] = json_
    if content is not None:
        request["content"] = content
    return pytest.param(request, settings or {}, status, loc, reason, id=id_)


CASES = [
    # types
    case("name-not-a-string", ["body", "name"], "valid string", json_=spec(name=5)),
    case("name-empty", ["body", "name"], "at least 1 character", json_=spec(name="")),
    case("name-missing", ["body", "name"], "field required", json_=spec(name=...)),
    case("estimators-missing", ["body"], "list at least one estimator or method", json_=spec(estimators=...)),
    case("estimators-a-string", ["body", "estimators"], "valid array", json_=spec(estimators="aqe")),
    case("estimator-a-number", ["body", "estimators", 0], "valid string", json_=spec(estimators=[5])),
    case("epochs-a-word", ["body", "epochs"], "valid integer", json_=spec(epochs="ten")),
    case("epochs-fractional", ["body", "epochs"], "valid integer", json_=spec(epochs=1.5)),
    # no coercion: what the JSON schema calls an integer, a number or a boolean is one
    case("epochs-a-string", ["body", "epochs"], "valid integer", json_=spec(epochs="3")),
    case("epochs-a-whole-float", ["body", "epochs"], "valid integer", json_=spec(epochs=3.0)),
    case("epochs-a-boolean", ["body", "epochs"], "valid integer", json_=spec(epochs=True)),
    case("lr-a-string", ["body", "optimizer", "lr"], "valid number", json_=spec(optimizer={"lr": "0.1"})),
    case("include-fp-a-number", ["body", "include_full_precision"], "valid boolean",
         json_=spec(include_full_precision=0)),
    case("seed-a-string", ["body", "seeds", 0], "valid integer", json_=spec(seeds=["1"])),
    case("train-size-a-string", ["body", "dataset_options", "train_size"], "valid integer",
         json_=spec(dataset_options={"train_size": "100"})),
    case("seeds-a-string", ["body", "seeds"], "valid array", json_=spec(seeds="0,1")),
    case("full-precision-not-bool", ["body", "include_full_precision"], "valid boolean",
         json_=spec(include_full_precision="maybe")),
    case("bits-w-a-word", ["body", "bits", 0, "w"], "valid integer", json_=spec(bits=[{"w": "one", "a": 1}])),
    case("dataset-options-a-list", ["body", "dataset_options"], "should be an object", json_=spec(dataset_options=[1])),
    # dataset options: the data set's own, checked at POST (never where data live or whether to download)
    case("dataset-option-unknown", ["body", "dataset_options", "bogus"], "extra inputs are not permitted",
         json_=spec(dataset_options={"bogus": 1})),
    case("dataset-option-data-dir", ["body", "dataset_options", "data_dir"], "extra inputs are not permitted",
         json_=spec(dataset_options={"data_dir": "/etc"})),
    case("dataset-option-download", ["body", "dataset_options", "download"], "extra inputs are not permitted",
         json_=spec(dataset_options={"download": True})),
    case("dataset-option-train-size-negative", ["body", "dataset_options", "train_size"],
         "greater than or equal to 1", json_=spec(dataset_options={"train_size": -5})),
    case("dataset-option-val-size-fraction-1", ["body", "dataset_options", "val_size"], "less than 1",
         json_=spec(dataset_options={"val_size": 1.0})),
    case("dataset-option-of-another-data-set", ["body", "dataset_options", "n_train"], "extra inputs",
         json_=spec(dataset_options={"n_train": 10})),
    case("synthetic-shape-2d", ["body", "dataset_options", "shape"], "at least 3 items",
         json_=spec(dataset="synthetic", model="convnet_a", dataset_options={"shape": [3, 32]})),
    case("synthetic-too-large", ["body", "dataset_options"], "over the limit",
         json_=spec(dataset="synthetic", model="convnet_a", dataset_options={"n_train": 10**7})),
    case("params-a-list", ["body", "estimators", 0, "params"], "should be an object",
         json_=spec(estimators=[{"name": "aqe", "params": [1]}])),
    # registry names and parameters
    case("unknown-estimator", ["body", "estimators", 0], "unknown estimator 'nope'; known: approx_sign",
         json_=spec(estimators=["aqe", "nope"][1:])),
    case("unknown-estimator-in-object", ["body", "estimators", 1], "unknown estimator",
         json_=spec(estimators=["aqe", {"name": "stee"}])),
    case("unknown-estimator-param", ["body", "estimators", 0], "bogus",
         json_=spec(estimators=[{"name": "aqe", "params": {"bogus": 1}}])),
    case("aqe-bad-backward", ["body", "estimators", 0], "eq18, alg1, autodiff",
         json_=spec(estimators=[{"name": "aqe", "params": {"backward": "eq99"}}])),
    # quantizer grids: an estimator that cannot use the spec's grid is named with the grids it can use
    case("quantizer-an-estimator-cannot-use", ["body", "quantizer"],
         "estimator 'ewgs' cannot quantize to the 'minw' grid, only to uniform_signed",
         json_=spec(estimators=["aqe", "ewgs"], quantizer="minw")),
    case("quantizer-two-estimators-cannot-use", ["body", "quantizer"],
         "estimator 'lsq' cannot quantize to the 'uniform' grid, only to learned_step; estimator 'ewgs' cannot",
         json_=spec(estimators=["aqe", "lsq", "ewgs"], quantizer="uniform")),
    case("quantizer-unknown", ["body", "quantizer"], "unknown quantizer grid 'int4'; known: minw, uniform",
         json_=spec(quantizer="int4")),
    case("quantizer-and-an-estimators-own-grid", ["body", "quantizer"], "aqe[grid=minw] set their own grid",
         json_=spec(estimators=[{"name": "aqe", "params": {"grid": "minw"}}], quantizer="uniform")),
    case("estimator-grid-it-cannot-use", ["body", "estimators", 0],
         "aqe: grid='learned_step' is not allowed; choose one of minw, uniform, uniform_signed",
         json_=spec(estimators=[{"name": "aqe", "params": {"grid": "learned_step"}}])),
    case("act-stats-unknown", ["body", "estimators", 0], "choose one of per_sample, per_batch, running",
         json_=spec(estimators=[{"name": "aqe", "params": {"act_stats": "per_channel"}}])),
    case("unknown-dataset", ["body", "dataset"], "unknown dataset 'imagenet21k'; known:",
         json_=spec(dataset="imagenet21k")),
    case("unknown-model", ["body", "model"], "unknown model 'resnet50'; known:", json_=spec(model="resnet50")),
    # bits
    case("bits-0", ["body", "bits", 0, "w"], "bit width 0 is not supported", json_=spec(bits=[{"w": 0, "a": 1}])),
    case("bits-9", ["body", "bits", 0, "a"], "bit width 9 is not supported", json_=spec(bits=[{"w": 1, "a": 9}])),
    case("bits-negative", ["body", "bits", "w"], "bit width -1", json_=spec(bits={"w": [-1, 1], "a": 1})),
    case("bits-empty-list", ["body", "bits"], "must not be empty", json_=spec(bits=[])),
    case("bits-empty-w", ["body", "bits", "w"], "must not be empty", json_=spec(bits={"w": [], "a": 1})),
    case("bits-duplicate-cells", ["body", "bits"], "duplicate bit configurations: W1A1",
         json_=spec(bits=[{"w": 1, "a": 1}, {"w": 2, "a": 2}, {"w": 1, "a": 1}])),
    case("bits-duplicate-in-product", ["body", "bits", "a"], "repeats a bit width",
         json_=spec(bits={"w": [1, 2], "a": [2, 2]})),
    case("bits-w32a32", ["body", "bits"], "W32A32 is the full-precision reference",
         json_=spec(bits=[{"w": 1, "a": 1}, {"w": 32, "a": 32}])),
    # grid cells and sizes
    case("estimators-empty", ["body"], "list at least one estimator or method", json_=spec(estimators=[])),
    case("estimators-duplicate", ["body", "estimators"], "duplicate estimators", json_=spec(estimators=["aqe", "aqe"])),
    case("seeds-empty", ["body", "seeds"], "at least 1 item", json_=spec(seeds=[])),
    case("seeds-duplicate", ["body", "seeds"], "duplicate seeds", json_=spec(seeds=[0, 1, 0])),
    case("seeds-negative", ["body", "seeds"], "[0, 2^32", json_=spec(seeds=[-1])),
    case("seeds-2^32", ["body", "seeds"], "[0, 2^32", json_=spec(seeds=[0, 2**32])),
    case("epochs-0", ["body", "epochs"], "greater than or equal to 1", json_=spec(epochs=0)),
    case("epochs-1e6", ["body", "epochs"], "less than or equal to 10000", json_=spec(epochs=1_000_000)),
    case("batch-size-0", ["body", "batch_size"], "greater than or equal to 1", json_=spec(batch_size=0)),
    case("grid-over-limit-override", ["body"], "11 trials, over the limit of 10",
         json_=spec(seeds=list(range(11)), include_full_precision=False), settings={"max_trials": 10}),
    case("grid-over-default-limit", ["body"], "over the limit of 2000",
         json_=spec(estimators=["aqe", "ste", "clipped_ste", "dorefa", "approx_sign"],
                    bits={"w": [1, 2, 3, 4, 5, 6, 7, 8], "a": [1, 2, 3, 4, 5, 6, 7, 8]}, seeds=list(range(7)))),
    # optimiser, schedule, resources
    case("lr-0", ["body", "optimizer", "lr"], "greater than 0", json_=nested("optimizer.lr", 0)),
    case("lr-negative", ["body", "optimizer", "lr"], "greater than 0", json_=nested("optimizer.lr", -0.1)),
    case("optimizer-unknown", ["body", "optimizer", "name"], "'adam', 'adamw' or 'sgd'",
         json_=nested("optimizer.name", "rmsprop")),
    case("gamma-0", ["body", "lr_schedule", "gamma"], "greater than 0", json_=nested("lr_schedule.gamma", 0)),
    case("cpu-negative", ["body", "resources", "cpu"], "greater than 0", json_=nested("resources.cpu", -1)),
    case("gpu-negative", ["body", "resources", "gpu"], "greater than or equal to 0",
         json_=nested("resources.gpu", -0.5)),
    case("max-retries-11", ["body", "max_retries"], "less than or equal to 10", json_=spec(max_retries=11)),
    # unknown fields
    case("unknown-top-level-field", ["body", "learning_rate"], "extra inputs are not permitted",
         json_=spec(learning_rate=0.1)),
    case("unknown-nested-field", ["body", "optimizer", "beta1"], "extra inputs are not permitted",
         json_=nested("optimizer.beta1", 0.9)),
    case("unknown-field-in-bits", ["body", "bits", 0, "x"], "extra inputs are not permitted",
         json_=spec(bits=[{"w": 1, "a": 1, "x": 2}])),
    case("unknown-field-in-estimator", ["body", "estimators", 0, "param"], "extra inputs are not permitted",
         json_=spec(estimators=[{"name": "aqe", "param": {}}])),
    # not a spec at all
    case("not-json", ["body"], "invalid json", content=b"name=bad&estimators=aqe"),
    case("truncated-json", ["body"], "invalid json", content=json.dumps(VALID)[:-3].encode()),
    case("empty-body", ["body"], "invalid json", content=b""),
    case("json-array", ["body"], "should be an object", json_=[VALID]),
    case("json-string", ["body"], "should be an object", json_="aqe"),
    case("not-utf8", ["body"], "not utf-8", content=b'{"name": "\xff\xfe"}'),
    case("deeply-nested", ["body"], "recursion limit", content=b'{"name": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
    case("body-over-1mib", ["body"], "over 1048576 bytes", status=413, json_=spec(name="x" * MIB)),
    case("body-over-1mib-chunked", ["body"], "over 1048576 bytes", status=413,
         content=[b'{"name": "', b"x" * (MIB // 2), b"x" * (MIB // 2), b'"}']),  # a list: sent chunked
    case("body-over-small-limit", ["body"], "over 100 bytes", status=413, json_=spec(name="x" * 200),
         settings={"max_body_bytes": 100}),
    # headers
    case("no-token", ["header", "Authorization"], "bearer token is required", status=401, json_=VALID,
         settings={"api_token": TOKEN}),
    case("bad-token", ["header", "Authorization"], "token is wrong", status=401, json_=VALID,
         headers={"Authorization": "Bearer not-it"}, settings={"api_token": TOKEN}),
    case("bad-token-on-cancel", ["header", "Authorization"], "token is wrong", status=401, url="/runs/1/cancel",
         json_={}, headers={"Authorization": "Bearer not-it"}, settings={"api_token": TOKEN}),
    case("cancel-with-parameters", ["body"], "takes no parameters", url="/runs/1/cancel", json_={"now": True}),
    case("cancel-body-a-list", ["body"], "takes no parameters", url="/runs/1/cancel", json_=[]),
    case("cancel-body-not-json", ["body"], "not json", url="/runs/1/cancel", content=b"}\xff\x16"),
    case("cancel-body-deeply-nested", ["body"], "not json", url="/runs/1/cancel", content=b"[" * 100_000),
    # writes are JSON from this service's own pages (or from clients that send no Origin)
    case("form-body", ["header", "Content-Type"], "not 'application/x-www-form-urlencoded'", status=415,
         content=b"name=bad&estimators=aqe", headers={"Content-Type": "application/x-www-form-urlencoded"}),
    case("text-plain-body", ["header", "Content-Type"], "not 'text/plain'", status=415, content=json.dumps(VALID),
         headers={"Content-Type": "text/plain"}),
    case("no-content-type", ["header", "Content-Type"], "no content-type", status=415, content=json.dumps(VALID),
         headers={"Content-Type": ""}),
    case("cancel-without-json", ["header", "Content-Type"], "no content-type", status=415, url="/runs/1/cancel"),
    case("foreign-origin", ["header", "Origin"], "is refused", status=403, json_=VALID,
         headers={"Origin": "https://evil.example"}),
    case("foreign-origin-with-token", ["header", "Origin"], "is refused", status=403, json_=VALID,
         headers={"Origin": "https://evil.example", "Authorization": f"Bearer {TOKEN}"}, settings={"api_token": TOKEN}),
    case("foreign-origin-on-cancel", ["header", "Origin"], "is refused", status=403, url="/runs/1/cancel", json_={},
         headers={"Origin": "http://testserver.evil.example"}),
    case("idempotency-key-too-long", ["header", "Idempotency-Key"], "at most 200 characters", json_=VALID,
         headers={"Idempotency-Key": "k" * 201}),
    # query and path parameters
    case("limit-0", ["query", "limit"], "greater than or equal to 1", method="get", url="/runs?limit=0"),
    case("offset-negative", ["query", "offset"], "greater than or equal to 0", method="get", url="/runs?offset=-1"),
    case("status-unknown", ["query", "status"], "'queued', 'running'", method="get", url="/runs?status=paused"),
    case("run-id-not-int", ["path", "run_id"], "valid integer", method="get", url="/runs/abc"),
    case("export-format", ["query", "format"], "'csv' or 'json'", method="get", url="/runs/1/export?format=xml"),
    case("unknown-run", ["path", "run_id"], "run 424242 not found", status=404, method="get", url="/runs/424242"),
    # ids are SQL INTEGER: one past PostgreSQL's int4 or SQLite's int64 is refused before the database
    *(case(f"{name}-{n}", ["path", param], "less than or equal to 2147483647", method=method, url=url.format(n),
           json_=json_)
      for n in (2**31, 2**63) for name, method, url, param in [
          ("run", "get", "/runs/{}", "run_id"), ("run-trials", "get", "/runs/{}/trials", "run_id"),
          ("export", "get", "/runs/{}/export", "run_id"), ("report", "get", "/runs/{}/report", "run_id"),
          ("cancel", "post", "/runs/{}/cancel", "run_id"), ("trial", "get", "/trials/{}", "trial_id")]
      for json_ in [{} if method == "post" else None]),
    case("run-id-0", ["path", "run_id"], "greater than or equal to 1", method="get", url="/runs/0"),
    case("trial-id-negative", ["path", "trial_id"], "greater than or equal to 1", method="get", url="/trials/-1"),
    case("offset-over-int4", ["query", "offset"], "less than or equal to 2147483647", method="get",
         url=f"/runs?offset={2**31}"),
    case("offset-over-int64", ["query", "offset"], "less than or equal to 2147483647", method="get",
         url=f"/runs?offset={2**63}"),
    case("leaderboard-run-id-over-int4", ["query", "run_id"], "less than or equal to 2147483647", method="get",
         url=f"/leaderboard?run_id={2**31}"),
]


@pytest.mark.parametrize("request_, settings, status, loc, reason", CASES)
def test_bad_request(make_api, request_, settings, status, loc, reason):
    api = make_api(**settings)
    auth = {"Authorization": f"Bearer {TOKEN}"} if settings.get("api_token") else {}
    api.post("/runs", json=VALID, headers=auth)  # one run, so ids and counts are not trivially 0
    before = api.counts()

    if isinstance(request_.get("content"), list):
        request_ = {**request_, "content": iter(request_["content"])}
    r = api.request(**request_)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    assert all(d["loc"] and d["msg"] for d in detail)
    assert any(d["loc"] == loc and reason.lower() in d["msg"].lower() for d in detail), detail
    assert api.counts() == before


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


# -- the body limit below HTTP clients: a lying Content-Length ----------------------------------
def _asgi_post(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, dict]:
    """POST /runs straight through the ASGI app: ``chunks`` as the body, ``headers`` as sent."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/runs", "raw_path": b"/runs", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 1), "server": ("test", 80), "state": {}, "app": app}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_body_limit_counts_bytes_whatever_content_length_says(make_api):
    api = make_api(max_body_bytes=200)
    app = api.client.app
    body = json.dumps(spec(name="x" * 150)).encode()  # ~230 bytes
    status, answer = _asgi_post(app, [(b"content-length", b"10")], [body[:100], body[100:]])
    assert status == 413 and answer["detail"][0]["loc"] == ["body"]
    assert _asgi_post(app, [(b"content-length", b"5000")], [b"{}"])[0] == 413  # declared too large
    assert _asgi_post(app, [(b"transfer-encoding", b"chunked")], [body[:100], body[100:]])[0] == 413
    assert api.counts()["runs"] == 0
    small = json.dumps(VALID).encode()
    status, answer = _asgi_post(app, [(b"transfer-encoding", b"chunked")], [small[:20], small[20:]])
    assert status == 202 and api.counts()["runs"] == 1
