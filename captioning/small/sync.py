"""The round trip through a Label Studio server: ``annotations push``, ``pull`` and ``serve``.

- **push**: writes the tasks (``annotations export``), then finds the project by title (or
  creates it with our labeling config), connects a Local Files storage for the images when
  ``image_source: files``, and imports the tasks whose key the project does not have yet, with
  their images and the VLM drafts as predictions. Pushing again adds only new candidates.
- **pull**: asks the server for an export of every task (``export_type``: JSON or JSON_MIN),
  keeps it under ``<export_dir>/pulls/`` (the last ``keep_pulls``), and reconciles the store
  with it (:func:`captioning.small.importer.import_file`, ``reconcile``) with the server's user
  list, so each annotator is their user id and the email is known for display. Pulling again
  adds only what changed: new texts, edits, reverts, and ``withdrawn`` versions for annotations
  deleted or turned into skips. For JSON-MIN, which leaves skipped tasks out, the server's task
  list supplies them, so skips are counted the same in both formats.
- **serve**: runs a local server (:mod:`captioning.small.lsserver`) until Ctrl-C.

Images: with ``image_source: url`` a task points at the image's original URL (the annotator's
browser loads it from there). With ``files`` the bytes are written to ``<export_dir>/images/``
and served by Label Studio itself: the tasks use ``/data/local-files/?d=images/<key>.<ext>``,
the server runs with local file serving on and its document root at ``<export_dir>``, and
push connects a Local Files storage at that folder (Label Studio serves a file only to users
of a project with a storage that covers it).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from captioning.small import annotations as an
from captioning.small import labelstudio as ls
from captioning.small.lsclient import LabelStudioClient, LabelStudioError
from paradiffusion.config import RootConfig
from paradiffusion.log import get_logger
from paradiffusion.stage import StageSummary, announce
from paradiffusion.storage import join

log = get_logger("captioning.small.labelstudio")

IMPORT_BATCH = 500


def data_dir(cfg: RootConfig) -> str:
    return cfg.annotations.label_studio.data_dir or join(cfg.project.data_root, "labelstudio")


def server_url(cfg: RootConfig) -> str:
    lc = cfg.annotations.label_studio
    return (lc.url or f"http://127.0.0.1:{lc.port}").rstrip("/")


def resolve_token(cfg: RootConfig) -> str:
    """The API token: ``$<token_env>``, else ``token_file``, else ``<data_dir>/api_token``
    (written by ``make labelstudio``)."""
    lc = cfg.annotations.label_studio
    if os.environ.get(lc.token_env, "").strip():
        return os.environ[lc.token_env].strip()
    path = Path(lc.token_file or join(data_dir(cfg), "api_token"))
    if path.exists():
        return path.read_text().strip()
    raise LabelStudioError(
        f"no Label Studio API token: set {lc.token_env} (Account & Settings -> Personal Access Token in "
        f"Label Studio), or set annotations.label_studio.token_file; `make labelstudio` writes {path}"
    )


def client(cfg: RootConfig) -> LabelStudioClient:
    return LabelStudioClient(server_url(cfg), resolve_token(cfg), cfg.annotations.label_studio.timeout_s)


def _local_export_dir(cfg: RootConfig) -> str:
    """The task folder, which Label Studio's Local Files storage serves: a folder on this machine."""
    d = an.export_dir(cfg)
    if "://" in d:
        from paradiffusion.config import ConfigError

        raise ConfigError(
            f"annotations.export_dir = {d!r}: Label Studio serves the task images from a local folder; with the "
            "data root on object storage set annotations.export_dir to a local path (e.g. --set "
            "annotations.export_dir=annotation_tasks)"
        )
    return d


def _storage_path(cfg: RootConfig) -> str:
    lc = cfg.annotations.label_studio
    return lc.storage_path or str(Path(_local_export_dir(cfg), "images").absolute())


def push(cfg: RootConfig) -> StageSummary:
    """Export the tasks and import the new ones into the Label Studio project (see the module doc)."""
    ac = cfg.annotations
    lc = ac.label_studio
    out = Path(_local_export_dir(cfg))
    an.export_tasks(cfg)
    tasks = json.loads((out / "tasks.json").read_text())
    label_config = (out / "labeling_config.xml").read_text()
    announce("annotations push", {"server": server_url(cfg), "project": lc.project, "tasks": len(tasks)})
    summary = StageSummary("annotations push")
    summary.n_in = len(tasks)
    with client(cfg) as c:
        project = c.find_project(lc.project)
        if project is None:
            project = c.create_project(lc.project, label_config, "ParaImage-Small: describe each image by hand")
            log.info("created project %r (id %s)", lc.project, project["id"])
            summary.extra["project"] = f"{project['id']} (created)"
        else:
            summary.extra["project"] = str(project["id"])
            if project.get("label_config", "").strip() != label_config.strip():
                log.warning(
                    "project %r has a labeling config other than %s; left as it is (change it in the project's "
                    "settings if you mean to)",
                    lc.project,
                    out / "labeling_config.xml",
                )
        pid = int(project["id"])
        if ac.image_source == "files":
            path = _storage_path(cfg)
            if not any(os.path.normpath(s.get("path", "")) == os.path.normpath(path) for s in c.local_storages(pid)):
                c.add_local_storage(pid, path, "ParaImage-Small images")
                log.info("connected a Local Files storage at %s", path)
        have = c.task_keys(pid)
        new = [t for t in tasks if t["data"]["key"] not in have]
        if len(tasks) - len(new):
            summary.reject("already_in_project", len(tasks) - len(new))
        for i in range(0, len(new), IMPORT_BATCH):
            c.import_tasks(pid, new[i : i + IMPORT_BATCH])
        summary.n_out = len(new)
    _write_json(
        out / "labelstudio.json",
        {"url": server_url(cfg), "project_id": pid, "project": lc.project, "pushed_at": _now_iso()},
    )
    summary.extra["tasks_in_project"] = len(have) + len(new)
    summary.finish()
    summary.print()
    return summary


def pull(cfg: RootConfig, export_type: str | None = None) -> an.ImportResult:
    """Export every task through the API and import the annotations (see the module doc)."""
    lc = cfg.annotations.label_studio
    kind = export_type or lc.export_type
    if kind not in ("JSON", "JSON_MIN"):
        raise ValueError(f"export type must be JSON or JSON_MIN, got {kind!r}")
    with client(cfg) as c:
        project = c.find_project(lc.project)
        if project is None:
            raise LabelStudioError(
                f"{server_url(cfg)} has no project titled {lc.project!r}: run `paradiffusion annotations push` first"
            )
        users = {ls.annotator_id(uid): email for uid, email in c.users().items()}
        data = c.export(int(project["id"]), kind)
        # JSON-MIN leaves skipped tasks out: the task list (read after the export) has them
        tasks = _task_infos(c.tasks(int(project["id"]))) if kind == ls.JSON_MIN else None
    pulls = Path(_local_export_dir(cfg)) / "pulls"
    pulls.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    path = pulls / f"project-{project['id']}-{stamp}-{kind.lower().replace('_', '-')}.json"
    _write_local_atomic(path, data)
    log.info("pulled a %s export of project %s: %s", kind, project["id"], path)
    _prune(pulls, f"project-{project['id']}-*.json", lc.keep_pulls)
    return an.import_file(cfg, str(path), users=users, reconcile=True, tasks=tasks)


def _task_infos(tasks: list[dict]) -> list[ls.TaskInfo]:
    """The task list's counters of each task with a key (tasks without one are not ours)."""
    out = []
    for t in tasks:
        key = (t.get("data") or {}).get("key")
        if key is not None:
            out.append(
                ls.TaskInfo(
                    int(t["id"]),
                    str(key),
                    int(t.get("total_annotations") or 0),
                    int(t.get("cancelled_annotations") or 0),
                )
            )
    return out


def _prune(folder: Path, pattern: str, keep: int) -> None:
    """Keep the newest ``keep`` files of ``pattern`` (names sort by their time stamp)."""
    for old in sorted(folder.glob(pattern))[:-keep]:
        old.unlink(missing_ok=True)


def serve(cfg: RootConfig, install_only: bool = False) -> int:
    """Install (first time) and run a local Label Studio until interrupted."""
    import signal
    import threading

    from captioning.small import lsserver

    lc = cfg.annotations.label_studio
    exe = lsserver.ensure_installed(lc.venv, lc.version)
    if install_only:
        print(f"label-studio {lc.version} is installed: {exe}")
        return 0
    files_root = Path(_local_export_dir(cfg)).absolute()
    files_root.mkdir(parents=True, exist_ok=True)
    server = lsserver.LabelStudioServer(
        exe,
        data_dir(cfg),
        lc.port,
        lc.admin_email,
        os.environ.get(lc.password_env) or None,
        files_root,
        lsserver.empty_database(lc.venv),
    )
    announce(
        "annotations serve",
        {"url": server.url, "data": str(server.data_dir), "local files under": str(files_root), "database": "SQLite"},
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with server.start(lc.start_timeout_s):
        token_file = server.data_dir / "api_token"
        lsserver.admin_token(server)
        password = f"${lc.password_env}" if os.environ.get(lc.password_env) else str(server.data_dir / "admin_password")
        print(
            f"\nLabel Studio {lc.version} is up at {server.url} (started in {server.started_in:.0f} s)\n"
            f"  log in:      {server.admin_email}, password in {password}\n"
            f"  API token:   {token_file} (push/pull read it; or export {lc.token_env}=...)\n"
            f"  annotators:  invite them with {lsserver.invite_url(server.url, lsserver.admin_token(server))}\n"
            "  next:        paradiffusion annotations push; ... annotate ...; paradiffusion annotations pull\n"
            "Ctrl-C stops it.",
            flush=True,
        )
        while not stop.wait(1.0):
            if server.proc is not None and server.proc.poll() is not None:
                print(f"Label Studio exited ({server.proc.returncode}):\n{server.log_tail()}")
                return 1
    return 0


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_local_atomic(path: Path, data: bytes) -> None:
    """A local file written whole or not at all (temp file + rename): Label Studio's side of the
    export folder is always local (checked by ``_local_export_dir``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, doc: dict) -> None:
    _write_local_atomic(path, json.dumps(doc, indent=1).encode())
