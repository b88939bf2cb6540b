"""A small client for Label Studio's REST API: the calls the annotation round trip makes.

Why not ``label-studio-sdk``: for the seven endpoints used here it would bring opencv, nltk,
pandas, datamodel-code-generator and a dozen more packages into our environment; the REST API
is documented (https://api.labelstud.io) and stable across 1.x. This client was tested against
Label Studio 1.23.2 (``tests/captioning/small/test_labelstudio_server.py``).

Authentication: a *personal access token* (a JWT refresh token, Label Studio's default since
1.16) is exchanged at ``/api/token/refresh/`` for a short-lived access token sent as
``Authorization: Bearer``; it is refreshed when the server answers 401. A *legacy token* (an
organisation may still enable them) is sent as ``Authorization: Token``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from paradiffusion.deps import require
from paradiffusion.log import get_logger

log = get_logger("captioning.small.labelstudio")


class LabelStudioError(RuntimeError):
    """A Label Studio API call failed; the message names the call, the status and the server's words."""


def is_jwt(token: str) -> bool:
    """Personal access tokens are JWTs (three base64 parts); legacy tokens are 40 hex characters."""
    return token.count(".") == 2


class LabelStudioClient:
    """The API calls of the round trip, on one ``httpx.Client``."""

    def __init__(self, url: str, token: str, timeout: float = 120.0):
        httpx = require("httpx", extra="annotations")
        self.url = url.rstrip("/")
        self._token = token.strip()
        self._http = httpx.Client(base_url=self.url, timeout=timeout, follow_redirects=False)
        self._access: str | None = None

    # -- plumbing
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _auth(self, refresh: bool = False) -> dict[str, str]:
        if not is_jwt(self._token):
            return {"Authorization": f"Token {self._token}"}
        if self._access is None or refresh:
            r = self._http.post("/api/token/refresh/", json={"refresh": self._token})
            if r.status_code != 200:
                raise LabelStudioError(
                    f"POST {self.url}/api/token/refresh/: {r.status_code} {r.text[:300]} "
                    "(is the personal access token valid for this server?)"
                )
            self._access = r.json()["access"]
        return {"Authorization": f"Bearer {self._access}"}

    def request(self, method: str, path: str, ok: tuple[int, ...] = (200, 201), **kw: Any):
        """One API call; an expired access token is refreshed once."""
        httpx = require("httpx", extra="annotations")
        try:
            r = self._http.request(method, path, headers=self._auth(), **kw)
            if r.status_code == 401 and is_jwt(self._token):
                r = self._http.request(method, path, headers=self._auth(refresh=True), **kw)
        except httpx.HTTPError as exc:
            raise LabelStudioError(f"{method} {self.url}{path}: {exc} (is Label Studio running there?)") from exc
        if r.status_code not in ok:
            raise LabelStudioError(f"{method} {self.url}{path}: {r.status_code} {r.text[:500]}")
        return r

    # -- the calls
    def whoami(self) -> dict:
        return self.request("GET", "/api/current-user/whoami").json()

    def users(self) -> dict[int, str]:
        """user id -> email, for everyone in the organisation."""
        got = self.request("GET", "/api/users/").json()
        items = got["results"] if isinstance(got, dict) else got
        return {int(u["id"]): u.get("email") or "" for u in items}

    def projects(self) -> Iterator[dict]:
        page = 1
        while True:
            got = self.request("GET", "/api/projects/", params={"page": page, "page_size": 100}).json()
            items = got["results"] if isinstance(got, dict) else got
            yield from items
            if not isinstance(got, dict) or not got.get("next"):
                return
            page += 1

    def find_project(self, title: str) -> dict | None:
        found = [p for p in self.projects() if p.get("title") == title]
        if len(found) > 1:
            ids = ", ".join(str(p["id"]) for p in found)
            raise LabelStudioError(f"{len(found)} projects are titled {title!r} (ids {ids}): rename all but one")
        return found[0] if found else None

    def create_project(self, title: str, label_config: str, description: str = "") -> dict:
        return self.request(
            "POST", "/api/projects/", json={"title": title, "label_config": label_config, "description": description}
        ).json()

    def update_project(self, project_id: int, **fields: Any) -> dict:
        return self.request("PATCH", f"/api/projects/{project_id}/", json=fields).json()

    def local_storages(self, project_id: int) -> list[dict]:
        return self.request("GET", "/api/storages/localfiles/", params={"project": project_id}).json()

    def add_local_storage(self, project_id: int, path: str, title: str) -> dict:
        """A Local Files import storage: lets the server serve ``/data/local-files/?d=...`` under
        ``path`` to the project's users (tasks are imported by us, not synced from it)."""
        return self.request(
            "POST",
            "/api/storages/localfiles/",
            json={"project": project_id, "path": path, "title": title, "use_blob_urls": False},
        ).json()

    def task_keys(self, project_id: int) -> dict[str, int]:
        """``data.key`` -> task id of every task in the project."""
        return {str(key): int(t["id"]) for t in self.tasks(project_id) if (key := (t.get("data") or {}).get("key"))}

    def tasks(self, project_id: int) -> list[dict]:
        """Every task of the project as the task list shows it (``id``, ``data``,
        ``total_annotations`` = annotations not cancelled, ``cancelled_annotations`` = skips)."""
        out: list[dict] = []
        page = 1
        while True:
            r = self.request(
                "GET",
                "/api/tasks/",
                ok=(200, 404),
                params={"project": project_id, "page": page, "page_size": 500, "fields": "task_only"},
            )
            if r.status_code == 404:  # past the last page
                return out
            got = r.json()
            tasks = got.get("tasks", []) if isinstance(got, dict) else got
            out += [t for t in tasks if isinstance(t, dict) and "id" in t]
            if not tasks or len(out) >= int(got.get("total", 0) if isinstance(got, dict) else 0):
                return out
            page += 1

    def import_tasks(self, project_id: int, tasks: list[dict]) -> dict:
        return self.request("POST", f"/api/projects/{project_id}/import", json=tasks).json()

    def export(self, project_id: int, export_type: str = "JSON") -> bytes:
        """Every task of the project (annotated or not) in ``export_type`` (JSON, JSON_MIN, ...)."""
        r = self.request(
            "GET",
            f"/api/projects/{project_id}/export",
            params={"exportType": export_type, "download_all_tasks": "true"},
        )
        return r.content
