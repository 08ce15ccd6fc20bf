"""`qaconv serve` tested with a real HTTP client (httpx) against the real server on 127.0.0.1: answers equal
the in-process Gallery's, and hostile requests get 4xx JSON errors without touching the store."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import qaconv
from qaconv import Gallery
from qaconv.engine.checkpoint import save_checkpoint
from qaconv.engine.runner import DEFAULTS, build_model

TINY = {"arch": "resnet18", "ibn": None, "pretrained": None, "height": 64, "width": 32, "neck": 16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], log: Path, attempts: int = 3):
    """Start the server on a free port (a port taken meanwhile is retried); returns (process, base URL)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(qaconv.__file__).parents[1]), env.get("PYTHONPATH", "")])
    for _ in range(attempts):
        port = _free_port()
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "qaconv", "serve", *argv, "--port", str(port)], env=env,
                                    stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                time.sleep(0.2)
        proc.kill()
        proc.wait()
        if "address already in use" not in log.read_text().lower():
            break
    raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tiny_domain, tmp_path_factory):
    """A store of the tiny test gallery, served with the query folder's parent as image root."""
    tmp = tmp_path_factory.mktemp("serve")
    cfg = {**DEFAULTS, **TINY}
    model, matcher = build_model(cfg, load_weights=False)
    save_checkpoint({"config": cfg, "model": model.state_dict(), "matcher": matcher.state_dict()},
                    tmp / "run" / "checkpoint.pt")  # fmt: skip
    gallery = Gallery.create(tmp / "store", tmp / "run", device="cpu")
    gallery.add_folder(tiny_domain / "bounding_box_test", progress=False)
    root = tmp / "images"
    shutil.copytree(tiny_domain / "query", root / "query")
    (root / "notes.jpg").write_bytes(b"this is not an image")
    (tmp / "secret.jpg").write_bytes((root / "query" / sorted(os.listdir(root / "query"))[0]).read_bytes())
    (root / "link.jpg").symlink_to(tmp / "secret.jpg")  # a symlink out of the root
    argv = ["--gallery", str(tmp / "store"), "--checkpoint", str(tmp / "run"), "--image-root", str(root),
            "--device", "cpu", "--max-upload-mb", "0.05"]  # fmt: skip
    proc, url = _start(argv, tmp / "server.log")
    yield url, root, tmp
    proc.terminate()
    proc.wait(timeout=30)


def _queries(root: Path) -> list[str]:
    return [f"query/{n}" for n in sorted(os.listdir(root / "query"))[:3]]


def test_search_by_path_and_by_upload_equal_the_in_process_gallery(served):
    url, root, tmp = served
    paths = _queries(root)
    got = httpx.post(f"{url}/search", json={"paths": paths, "top": 5, "candidates": 20}, timeout=60)
    assert got.status_code == 200, got.text
    gallery = Gallery.open(tmp / "store", tmp / "run", device="cpu")
    want = gallery.search([root / p for p in paths], top=5, candidates=20)
    results = got.json()["results"]
    assert [r["query"] for r in results] == paths
    for r, w in zip(results, want, strict=True):
        assert [h["path"] for h in r["hits"]] == [h["path"] for h in w]
        assert [h["score"] for h in r["hits"]] == pytest.approx([h["score"] for h in w], abs=1e-5)
    files = [("files", (Path(p).name, (root / p).read_bytes(), "image/jpeg")) for p in paths]
    up = httpx.post(f"{url}/search/upload", files=files, data={"top": "5", "candidates": "20"}, timeout=60)
    assert up.status_code == 200, up.text
    for r, w in zip(up.json()["results"], results, strict=True):
        assert [h["path"] for h in r["hits"]] == [h["path"] for h in w["hits"]]


def test_filters_and_exclude_same_camera_pass_through(served):
    url, root, _ = served
    paths = _queries(root)
    got = httpx.post(f"{url}/search", json={"paths": paths, "top": 50, "exclude_same_camera": True}, timeout=60)
    assert got.status_code == 200, got.text
    for path, r in zip(paths, got.json()["results"], strict=True):
        own = "c" + Path(path).name.split("_c")[1][0]  # Market name: camera label of the query
        assert r["hits"] and all(h["cam"] != own for h in r["hits"])
    got = httpx.post(f"{url}/search", json={"paths": paths, "top": 50, "cameras": ["c2"]}, timeout=60)
    assert got.status_code == 200 and all(h["cam"] == "c2" for r in got.json()["results"] for h in r["hits"])


def test_tracklet_queries_and_json_types_as_the_in_process_gallery(served):
    url, root, tmp = served
    paths = _queries(root)
    body = {"paths": paths, "top": 4, "query_tracks": ["t", "t", None], "query_cameras": ["c1", "c1", "c2"],
            "aggregate": "max", "group_by_track": True, "exclude_same_camera": None}
    got = httpx.post(f"{url}/search", json=body, timeout=60)
    assert got.status_code == 200, got.text
    answer = got.json()
    assert answer["score_kind"] == "max of the QAConv logits of crop pairs"
    assert [(r["query"], r["crops"]) for r in answer["results"]] == [(paths[0], paths[:2]), (paths[2], paths[2:])]
    gallery = Gallery.open(tmp / "store", tmp / "run", device="cpu")
    want = gallery.search([root / p for p in paths], top=4, query_tracks=["t", "t", None],
                          query_cameras=["c1", "c1", "c2"], aggregate="max", group_by_track=True,
                          exclude_same_camera=None)
    for r, w, cam in zip(answer["results"], want, ("c1", "c2"), strict=True):
        assert [h["path"] for h in r["hits"]] == [h["path"] for h in w]
        assert [h["score"] for h in r["hits"]] == pytest.approx([h["score"] for h in w], abs=1e-5)
        assert [h["query_crop"] for h in r["hits"]] == [paths[h["query_crop"]] for h in w]
        for h in r["hits"]:
            assert h["cam"] != cam and type(h["score"]) is float and type(h["row"]) is int
            assert h["pid"] is None or type(h["pid"]) is int
    plain = httpx.post(f"{url}/search", json={"paths": paths[:1], "top": 2}, timeout=60).json()
    assert plain["score_kind"] == "QAConv logit" and plain["results"][0]["crops"] == paths[:1]
    bad = httpx.post(f"{url}/search", json={**body, "query_tracks": ["t"]}, timeout=60)
    assert bad.status_code == 422 and "one label per query" in bad.json()["error"]


BAD = [
    ("post", "/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
    ("post", "/search", {"json": {"paths": ["query/x.jpg"], "topp": 3}}, 422),  # unknown field
    ("post", "/search", {"json": {"paths": []}}, 422),
    ("post", "/search", {"json": {"paths": ["query/a.jpg"], "top": 0}}, 422),
    ("post", "/search", {"json": {"paths": ["../secret.jpg"]}}, 403),  # outside the root
    ("post", "/search", {"json": {"paths": ["/etc/passwd"]}}, 403),  # absolute, outside
    ("post", "/search", {"json": {"paths": ["link.jpg"]}}, 403),  # a symlink out of the root
    ("post", "/search", {"json": {"paths": ["query/nope.jpg"]}}, 404),
    ("post", "/search", {"json": {"paths": ["notes.jpg"]}}, 415),  # not an image
    ("post", "/search/upload", {"files": [("files", ("x.jpg", b"GIF89a nonsense", "image/jpeg"))]}, 415),
    ("post", "/search/upload", {"files": [("files", ("big.jpg", b"\xff" * 60_000, "image/jpeg"))]}, 413),
    ("post", "/search/upload", {"data": {"top": "3"}}, 422),  # no files
    ("post", "/add", {"json": {"entries": [{"path": "query/a.jpg", "colour": "red"}]}}, 422),
    ("post", "/add", {"json": {"entries": [{"path": "../secret.jpg"}]}}, 403),
    ("post", "/add/upload", {"files": [("files", ("x.jpg", b"\x00" * 10, "image/jpeg"))]}, 415),
    ("get", "/nothing-here", {}, 404),
]


@pytest.mark.parametrize("method,route,kw,status", BAD, ids=[f"{m} {r} {s}" for m, r, _, s in BAD])
def test_hostile_requests_get_a_json_4xx_and_leave_the_store_alone(served, method, route, kw, status):
    url, _, _ = served
    before = httpx.get(f"{url}/health").json()["entries"]
    res = getattr(httpx, method)(f"{url}{route}", timeout=60, **kw)
    assert res.status_code == status, res.text
    body = res.json()
    assert isinstance(body.get("error"), str) and body["error"] and "\n" not in body["error"], body
    assert httpx.get(f"{url}/health").json()["entries"] == before


def test_concurrent_adds_never_corrupt_the_store(served):
    """8 threads add the same 3 new entries and 1 own entry each, at once: every request is 200 or 409,
    each path is in the store once, and a reopened store validates."""
    url, root, tmp = served
    names = sorted(os.listdir(root / "query"))
    shared = [{"path": f"query/{n}", "cam": "c9", "time": 5.0} for n in names[:3]]
    answers = []

    def add(i):
        own = {"path": f"query/{names[3 + i]}", "pid": 1000 + i, "cam": "c9"}
        entries = [own] if i % 2 else [*shared, own]
        res = httpx.post(f"{url}/add", json={"entries": entries}, timeout=120)
        answers.append((i, res.status_code, res.json()))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(code in (200, 409) for _, code, _ in answers), answers
    assert all("error" in body for _, code, body in answers if code == 409)
    added = [p for i, code, _ in answers if code == 200 for p in
             ([f"query/{names[3 + i]}"] if i % 2 else [e["path"] for e in shared] + [f"query/{names[3 + i]}"])]
    assert len(added) == len(set(added))  # nothing added twice
    gallery = Gallery.open(tmp / "store", tmp / "run", device="cpu")
    assert gallery.verify() == len(gallery)
    assert sorted(p for p in gallery.paths if p.startswith("query/")) == sorted(added)
    assert httpx.get(f"{url}/health").json()["entries"] == len(gallery)
    # the new entries are found: a query finds itself first
    hit = httpx.post(f"{url}/search", json={"paths": [added[0]], "top": 1}, timeout=60).json()
    assert hit["results"][0]["hits"][0]["path"] == added[0]


def test_upload_add_with_metadata(served):
    url, root, _ = served
    name = sorted(os.listdir(root / "query"))[-1]
    files = [("files", (name, (root / "query" / name).read_bytes(), "image/jpeg"))]
    meta = json.dumps([{"path": f"uploads/{name}", "pid": 7, "cam": "c1", "time": 3.5}])
    res = httpx.post(f"{url}/add/upload", files=files, data={"metadata": meta}, timeout=60)
    assert res.status_code == 200, res.text
    again = httpx.post(f"{url}/add/upload", files=files, data={"metadata": meta}, timeout=60)
    assert again.status_code == 409 and "already" in again.json()["error"]
    bad = httpx.post(f"{url}/add/upload", files=files, data={"metadata": "[{]"}, timeout=60)
    assert bad.status_code == 422 and "JSON" in bad.json()["error"]


def test_binds_loopback_by_default():
    from qaconv.cli import build_parser

    args = build_parser().parse_args(["serve", "--gallery", "g"])
    assert args.host == "127.0.0.1"
