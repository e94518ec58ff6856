"""A stand-in of ModelScope's hub API on loopback, serving local folders (the Hugging Face one is netns.hub).

The slice modelscope's snapshot_download uses: the repo's file listing
(`GET /api/v1/models/{org}/{name}/repo/files?Revision=..&Recursive=True`) and each file
(`GET /api/v1/models/{org}/{name}/repo?Revision=..&FilePath=..`); anything else answers 404 in
ModelScope's JSON shape. Point MODELSCOPE_ENDPOINT (and MODELSCOPE_DOMAIN, older versions) at `url`.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from pathlib import Path

from netns import Server, _Quiet


def modelscope(host: str, repos: dict[str, Path]) -> Server:
    class ModelScope(_Quiet):
        def _json(self, code: int, data: object) -> None:
            body = {
                "Code": code,
                "Success": code == 200,
                "Data": data,
                "Message": "" if code == 200 else "not found",
            }
            self._send(code, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def do_GET(self) -> None:
            self._note()
            url = urllib.parse.urlparse(self.path)
            query = urllib.parse.parse_qs(url.query)
            parts = urllib.parse.unquote(url.path).strip("/").split("/")
            repo = "/".join(parts[3:5])
            if parts[:3] != ["api", "v1", "models"] or repo not in repos:
                self._json(404, None)
                return
            folder = repos[repo]
            if parts[5:] == ["repo", "files"]:
                files = [
                    {"Path": f.name, "Name": f.name, "Type": "blob", "Size": f.stat().st_size,
                     "Sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "Revision": "master"}
                    for f in sorted(folder.iterdir()) if f.is_file()
                ]  # fmt: skip
                self._json(200, {"Files": files})
                return
            if parts[5:] == ["repo"] and (folder / query.get("FilePath", [""])[0]).is_file():
                data = (folder / query["FilePath"][0]).read_bytes()
                self._send(200, data, {"Content-Type": "application/octet-stream"})
                return
            self._json(404, None)

        do_HEAD = do_GET

    return Server.start(host, ModelScope)
