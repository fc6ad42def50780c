"""The review app (jobs/review/app.py, state.py) in process through Starlette's TestClient: the API a page uses, its
security (token, CSRF, CSP, the image endpoint's confinement), and decisions committed once."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image
from starlette.testclient import TestClient

from jobs.output.corrections import read_decisions
from jobs.review.app import CSRF_HEADER, csrf_of
from tests.jobs.review.conftest import CLASSES, PER_CLASS, TOKEN, app_over

HOST = "http://127.0.0.1:8470"


@pytest.fixture
def client(flagged):
    app, state = app_over(flagged.queue)
    with TestClient(app, base_url=HOST) as c:
        c.state = state
        assert c.get(f"/?token={TOKEN}", follow_redirects=False).status_code == 303  # the cookie, then no token
        yield c


def post(client, path: str, body: dict, **headers):
    return client.post(path, json=body, headers={CSRF_HEADER: csrf_of(TOKEN), **headers})


def test_two_reviewers_get_different_images_and_a_reload_gives_back_the_same(client, flagged):
    ana = post(client, "/api/next", {"reviewer": "ana"}).json()["item"]
    bo = post(client, "/api/next", {"reviewer": "bo"}).json()["item"]
    assert (ana["key"], bo["key"]) == flagged.keys[:2]
    assert ana["suggestions"] == [[CLASSES[1], 0.9]] and ana["given_label"] == CLASSES[0]
    assert post(client, "/api/next", {"reviewer": "ana"}).json()["item"]["key"] == ana["key"]  # a reload


def test_a_decision_is_recorded_once_whatever_the_retries_and_moves_the_queue_on(client, flagged):
    item = post(client, "/api/next", {"reviewer": "ana"}).json()["item"]
    body = {"decision_id": "a1b2c3d4e5f6", "reviewer": "ana", "key": item["key"], "decision": "label",
            "label": CLASSES[2]}  # fmt: skip
    first = post(client, "/api/decisions", body).json()
    again = post(client, "/api/decisions", body).json()  # the page retries after a lost answer
    assert (first["recorded"], again["recorded"]) == ("new", "already")
    assert first["progress"]["decided"] == 1 and first["progress"]["left"] == len(flagged.keys) - 1
    [stored] = read_decisions(client.state.queue.storage, client.state.queue.uri)
    assert (stored.key, stored.label, stored.previous_label, stored.reviewer) == (item["key"], CLASSES[2],
                                                                                  CLASSES[0], "ana")  # fmt: skip
    assert stored.image_id == hashlib.sha256((flagged.data / item["key"]).read_bytes()).hexdigest()
    assert post(client, "/api/next", {"reviewer": "ana"}).json()["item"]["key"] == flagged.keys[1]
    clash = post(client, "/api/decisions", body | {"label": CLASSES[1]})
    assert clash.status_code == 409 and "recorded already" in clash.json()["error"]


def test_undo_reopens_the_image_for_whoever_undid_it_and_skip_leaves_it_to_others(client, flagged):
    first = flagged.keys[0]
    post(client, "/api/decisions", {"decision_id": "bad-000001", "reviewer": "ana", "key": first, "decision": "bad",
                                    "bad_reason": "blurred"})  # fmt: skip
    undone = post(client, "/api/decisions", {"decision_id": "undo-000001", "reviewer": "ana", "key": first,
                                             "decision": "undo", "undoes": "bad-000001"}).json()  # fmt: skip
    assert undone["item"]["key"] == first and undone["item"]["decided"] is None and undone["progress"]["decided"] == 0
    assert post(client, "/api/next", {"reviewer": "bo"}).json()["item"]["key"] == flagged.keys[1]  # ana's again
    post(client, "/api/decisions", {"decision_id": "skip-000001", "reviewer": "ana", "key": first, "decision": "skip"})
    assert post(client, "/api/next", {"reviewer": "ana"}).json()["item"]["key"] == flagged.keys[2]
    assert post(client, "/api/next", {"reviewer": "cy"}).json()["item"]["key"] == first


def test_filters_by_predicted_and_given_label(client, flagged):
    item = post(client, "/api/next", {"reviewer": "ana", "given": CLASSES[1]}).json()["item"]
    assert item["given_label"] == CLASSES[1] and item["key"] == flagged.keys[PER_CLASS]
    item = post(client, "/api/next", {"reviewer": "bo", "predicted": CLASSES[0]}).json()["item"]
    assert item["given_label"] == CLASSES[2]  # whose suggestion wraps round to the first class
    assert post(client, "/api/next", {"reviewer": "cy", "given": "no such"}).json()["item"] is None


def test_the_image_is_a_resized_jpeg_of_a_queue_item_and_nothing_else(client):
    response = client.get("/image/0")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as image:
        assert max(image.size) <= 768 and image.getextrema()[0][1] > 0
    for path in ("/image/999", "/image/-1", "/image/..%2f..%2fetc%2fpasswd", "/image/0/../../../etc/passwd",
                 "/static/..%2fapp.py", "/static/app.py"):  # fmt: skip
        assert client.get(path).status_code == 404, path


def test_every_request_needs_the_token_and_every_write_the_csrf_token(flagged):
    app, _ = app_over(flagged.queue)
    with TestClient(app, base_url=HOST) as anonymous:
        for method, path in (("GET", "/"), ("GET", "/api/config"), ("GET", "/image/0"), ("POST", "/api/next")):
            assert anonymous.request(method, path).status_code == 403, path
        assert anonymous.get("/?token=wrong").status_code == 403
        landed = anonymous.get(f"/?token={TOKEN}", follow_redirects=False)
        assert landed.headers["location"] == "/"  # the token leaves the address bar
        cookie = landed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert anonymous.post("/api/next", json={"reviewer": "ana"}).status_code == 403  # a cookie, no CSRF token
        assert anonymous.post("/api/next", json={"reviewer": "ana"}, headers={CSRF_HEADER: "guess"}).status_code == 403
        forged = post(anonymous, "/api/next", {"reviewer": "ana"}, origin="http://evil.example")
        assert forged.status_code == 403 and "another origin" in forged.json()["error"]
        assert post(anonymous, "/api/next", {"reviewer": "ana"}, origin=HOST).status_code == 200
    with TestClient(app, base_url=HOST) as script:
        bearer = {"authorization": f"Bearer {TOKEN}"}
        assert script.post("/api/next", json={"reviewer": "bot"}, headers=bearer).status_code == 200
    with TestClient(app, base_url="http://rebound.example:8470") as rebinding:
        assert rebinding.get(f"/?token={TOKEN}").status_code == 400  # a loopback server answers loopback names only


def test_the_page_has_a_strict_csp_no_inline_script_and_escapes_what_it_shows(tmp_path):
    from tests.jobs.review.conftest import write_issues

    flagged = write_issues(tmp_path / "<script>alert(1)</script>", per_class=2)
    app, _ = app_over(flagged.queue)
    with TestClient(app, base_url=HOST) as client:
        page = client.get(f"/?token={TOKEN}")
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
        assert page.headers["referrer-policy"] == "no-referrer" and page.headers["x-frame-options"] == "DENY"
        assert "<script>alert(1)</script>" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert page.text.count("<script") == 1 and '<script src="/static/app.js"></script>' in page.text
        assert "innerHTML" not in client.get("/static/app.js").text


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"decision": "label", "label": "Tomato___healthy"}, 400, "unknown label"),
    ({"decision": "label", "label": CLASSES[0], "key": "../../etc/passwd"}, 404, "no item with key"),
    ({"decision": "undo", "undoes": "nosuchdecision"}, 404, "no decision nosuchdecision"),
    ({"decision": "label", "label": CLASSES[0], "decision_id": "../x"}, 400, "decision_id"),
    ({"decision": "label", "label": CLASSES[0], "reviewer": "<img src=x>"}, 400, "reviewer"),
    ({"decision": "label", "label": CLASSES[0], "extra": 1}, 400, "extra"),
])  # fmt: skip
def test_a_bad_decision_is_refused_in_one_line_and_nothing_is_recorded(client, flagged, body, status, says):
    request = {"decision_id": "d-00000001", "reviewer": "ana", "key": flagged.keys[0]} | body
    response = post(client, "/api/decisions", request)
    assert response.status_code == status and says in response.json()["error"], response.json()
    assert "\n" not in response.json()["error"]
    assert read_decisions(client.state.queue.storage, client.state.queue.uri) == []


def test_a_queue_on_s3_shows_its_s3_images_and_commits_decisions_there(s3_server, s3_prefix, flagged):
    import pyarrow as pa

    from jobs.output.results import ComputedResult, commit_result
    from schemas.curation import ISSUES_SCHEMA, LabelIssuesJobSpec
    from workers.io.storage import open_storage

    options = s3_server.options()
    store = open_storage(s3_prefix, options)
    rows = []
    for i, key in enumerate(flagged.keys[:3]):
        store.write_bytes(f"{s3_prefix}/data/{key}", (flagged.data / key).read_bytes())
        rows.append({"key": key, "image": f"{s3_prefix}/data/{key}", "given_label": key.split("/")[0],
                     "suggested_label": CLASSES[1], "self_confidence": 0.1, "suggested_score": 0.7, "flagged": True,
                     "rank": i + 1, "error": None})  # fmt: skip
    queue = f"{s3_prefix}/issues"
    spec = LabelIssuesJobSpec(data={"uri": f"{s3_prefix}/data"}, base={"name": "mobilenet_v2"}, output=queue)
    commit_result(queue, options, spec.resolved_job_id(), "label-issues", spec,
                  lambda: ComputedResult(table=pa.Table.from_pylist(rows, schema=ISSUES_SCHEMA)))  # fmt: skip
    app, state = app_over(queue, options=options)
    with TestClient(app, base_url=HOST) as client:
        client.get(f"/?token={TOKEN}")
        picture = client.get("/image/2")
        assert picture.status_code == 200 and picture.content[:2] == b"\xff\xd8"
        item = post(client, "/api/next", {"reviewer": "ana"}).json()["item"]
        body = {"decision_id": "s3-decision-1", "reviewer": "ana", "key": item["key"], "decision": "bad"}
        assert post(client, "/api/decisions", body).json()["recorded"] == "new"
    [stored] = read_decisions(state.queue.storage, queue)
    assert stored.decision_id == "s3-decision-1" and store.exists(f"{queue}/corrections/s3-decision-1.parquet")
