"""training/hub.py: the saved folder (safetensors, processor, model card) and the upload, through the real
huggingface_hub client talking HTTP to a small Hub stand-in on 127.0.0.1 (no network, no mock of the client).

`HubStandIn` answers the calls ``HfApi.create_repo`` and ``HfApi.upload_folder`` make: repo creation, the preupload
endpoint (small text files go "regular", weights go through git-LFS), the LFS batch API with a basic-transfer upload
URL, the upload itself, and the NDJSON commit. It keeps what was committed so the test can compare bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from mask2former.training import hub

REPO_ROOT = Path(__file__).resolve().parents[2]


class HubStandIn:
    """A thread serving the subset of the Hub's HTTP API that create_repo + upload_folder use."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[tuple[str, str]] = []
        self.validated_metadata: list[dict] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, status: int, payload: object) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                stand_in.requests.append(("POST", self.path))
                path = self.path.split("?")[0]
                body = self._body()
                if not self.headers.get("authorization", "").startswith("Bearer "):
                    return self._reply(401, {"error": "no token"})
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = (
                        f"{payload['organization'] or 'me'}/{payload['name']}"
                        if payload.get("organization")
                        else payload["name"]
                    )
                    url = f"http://{self.headers['Host']}/{repo_id}"
                    if repo_id in stand_in.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": url})
                    stand_in.repos[repo_id] = {
                        "private": payload.get("visibility") == "private" or bool(payload.get("private")),
                        "files": {},
                        "commits": [],
                    }
                    return self._reply(200, {"url": url})
                if path == "/api/validate-yaml":
                    # the Hub checks the model card's metadata block; so do we (it must be a YAML mapping)
                    content = json.loads(body)["content"]
                    try:
                        metadata = yaml.safe_load(content.split("---")[1])
                    except (IndexError, yaml.YAMLError) as error:
                        return self._reply(400, {"errors": [{"message": f"invalid metadata: {error}"}]})
                    if not isinstance(metadata, dict):
                        return self._reply(400, {"errors": [{"message": "metadata is not a mapping"}]})
                    stand_in.validated_metadata.append(metadata)
                    return self._reply(200, {"warnings": []})
                if path.startswith("/api/models/") and "/preupload/" in path:
                    files = json.loads(body)["files"]
                    modes = [
                        {
                            "path": item["path"],
                            "uploadMode": "lfs" if item["path"].endswith(".safetensors") else "regular",
                            "shouldIgnore": False,
                        }
                        for item in files
                    ]
                    return self._reply(200, {"files": modes})
                if path.endswith(".git/info/lfs/objects/batch"):
                    payload = json.loads(body)
                    host = self.headers["Host"]
                    objects = [
                        {
                            "oid": item["oid"],
                            "size": item["size"],
                            "authenticated": True,
                            "actions": {"upload": {"href": f"http://{host}/lfs-upload/{item['oid']}"}},
                        }
                        for item in payload["objects"]
                    ]
                    return self._reply(200, {"transfer": "basic", "objects": objects})
                if path.startswith("/api/models/") and "/commit/" in path:
                    repo_id, _, revision = path[len("/api/models/") :].partition("/commit/")
                    if repo_id not in stand_in.repos:
                        return self._reply(404, {"error": f"repo {repo_id} not found"})
                    repo = stand_in.repos[repo_id]
                    header = {}
                    for line in body.decode().splitlines():
                        entry = json.loads(line)
                        if entry["key"] == "header":
                            header = entry["value"]
                        elif entry["key"] == "file":
                            assert entry["value"]["encoding"] == "base64"
                            repo["files"][entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                        elif entry["key"] == "lfsFile":
                            oid = entry["value"]["oid"]
                            if oid not in stand_in.lfs_objects:
                                return self._reply(400, {"error": f"LFS object {oid} was never uploaded"})
                            repo["files"][entry["value"]["path"]] = stand_in.lfs_objects[oid]
                    repo["commits"].append({"revision": revision, "summary": header.get("summary", "")})
                    oid = hashlib.sha1(str(len(repo["commits"])).encode()).hexdigest()
                    return self._reply(
                        200,
                        {
                            "commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{oid}",
                            "commitOid": oid,
                            "pullRequestUrl": None,
                        },
                    )
                return self._reply(404, {"error": f"unexpected POST {path}"})

            def do_PUT(self):  # noqa: N802
                stand_in.requests.append(("PUT", self.path))
                body = self._body()
                oid = self.path.split("/lfs-upload/")[-1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._reply(400, {"error": "sha256 mismatch"})
                stand_in.lfs_objects[oid] = body
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def hub_client_env(endpoint: str) -> dict[str, str]:
    """Environment of a child process whose huggingface_hub talks to ``endpoint`` (over plain LFS, not Xet)."""
    env = dict(os.environ)
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN="hf_test_token",
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def _tiny_model_and_processor():
    from mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    from mask2former.training.settings import load_recipe

    recipe = load_recipe("tiny-test")
    labels = {"id2label": {0: "circle", 1: "sky"}, "label2id": {"circle": 0, "sky": 1}}
    model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(**recipe["model_config"], **labels)).eval()
    return model, Mask2FormerImageProcessor(**recipe["processor_config"]), recipe


def test_model_card_names_recipe_dataset_metrics_command_and_licence():
    card = hub.build_model_card(
        hub.ModelCardInfo(
            recipe={"name": "coco-panoptic-swin-t", "description": "paper recipe", "optimizer": {"lr": 1e-4}},
            dataset="me/coco-panoptic-parquet",
            task="panoptic",
            metrics={"PQ": 51.234, "SQ": 80.5},
            command="accelerate launch -m mask2former.training.train --recipe coco-panoptic-swin-t",
            steps=1234,
            base_model="facebook/mask2former-swin-tiny-coco-panoptic",
        )
    )
    front_matter = card.split("---")[1]
    assert "library_name: transformers" in front_matter and "panoptic-segmentation" in front_matter
    assert "- me/coco-panoptic-parquet" in front_matter
    assert "base_model: facebook/mask2former-swin-tiny-coco-panoptic" in front_matter
    assert "`coco-panoptic-swin-t`" in card and "paper recipe" in card
    assert "| PQ | 51.23 |" in card and "| SQ | 80.50 |" in card
    assert "--recipe coco-panoptic-swin-t" in card
    assert "Optimizer steps: 1234" in card
    assert hub.LICENCE_NOTE in card and '"lr": 0.0001' in card


def test_saved_folder_loads_in_stock_transformers_with_same_outputs(tmp_path):
    import transformers

    model, processor, _ = _tiny_model_and_processor()
    card = hub.ModelCardInfo(recipe={"name": "tiny-test"}, dataset="synthetic-shapes", task="panoptic")
    folder = hub.save_model(model, processor, tmp_path / "model", card)
    assert (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").exists()
    assert (folder / "preprocessor_config.json").is_file()
    assert "synthetic-shapes" in (folder / "README.md").read_text()

    stock = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model(pixel_values=pixel_values)
        theirs = stock(pixel_values=pixel_values)
    torch.testing.assert_close(theirs.class_queries_logits, ours.class_queries_logits, atol=1e-4, rtol=1e-4)
    assert stock.config.id2label == {0: "circle", 1: "sky"}


def test_push_folder_uploads_every_file_through_the_real_client(tmp_path):
    model, processor, _ = _tiny_model_and_processor()
    card = hub.ModelCardInfo(recipe={"name": "tiny-test"}, dataset="synthetic-shapes", task="panoptic")
    folder = hub.save_model(model, processor, tmp_path / "model", card)
    script = (
        "import sys; from mask2former.training.hub import push_folder; "
        "print(push_folder(sys.argv[1], 'me/tiny-mask2former', private=True, commit_message='first upload'))"
    )
    with HubStandIn() as stand_in:
        result = subprocess.run(
            [sys.executable, "-c", script, str(folder)],
            env=hub_client_env(stand_in.endpoint),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        # a second push to the existing repo (create_repo answers 409, exist_ok) adds a commit
        again = subprocess.run(
            [sys.executable, "-c", script.replace("first upload", "second upload"), str(folder)],
            env=hub_client_env(stand_in.endpoint),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
        assert again.returncode == 0, again.stderr[-3000:]

    repo = stand_in.repos["me/tiny-mask2former"]
    assert repo["private"] is True
    assert [commit["summary"] for commit in repo["commits"]] == ["first upload", "second upload"]
    local_files = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert set(repo["files"]) == set(local_files)
    for name, content in local_files.items():
        assert repo["files"][name] == content, name
    # the weights went through git-LFS (batch API + PUT), the JSON files inline in the commit
    assert ("PUT", f"/lfs-upload/{hashlib.sha256(local_files['model.safetensors']).hexdigest()}") in stand_in.requests
    assert "/commit/" in result.stdout
    assert stand_in.validated_metadata[0]["library_name"] == "transformers"


def test_push_folder_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        hub.push_folder(tmp_path, "me/empty")
