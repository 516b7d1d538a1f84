"""``terratile config validate``: beyond the schema, does this configuration work here?

Every configured folder exists (or its parent does, so the daemon can create it), the
seed bundle loads and verifies (every file's sha256), the installed active model too, and
with ``--connect`` the broker accepts the connection and credentials (MQTT 5 CONNACK).
Each problem is one line naming its key.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

from appliance.comms.mqtt import broker_client
from appliance.config import MQTTConfig, Settings
from appliance.contract.bundle import BundleError, load_bundle
from appliance.model.store import ModelStore


def _creatable(path: Path) -> bool:
    """True when the nearest existing ancestor of ``path`` is a folder we may write in."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def path_problems(settings: Settings) -> list[str]:
    """Folders under ``paths.*`` that neither exist nor could be created."""
    p = settings.paths
    problems = []
    for key, path in (("paths.inbox", p.inbox), ("paths.work", p.work_dir),
                      ("paths.results", p.results), ("paths.failed", p.failed),
                      ("paths.processed", p.processed_dir), ("paths.state", p.state)):
        if path.exists() and not path.is_dir():
            problems.append(f"{key}: {path} exists and is not a folder")
        elif not path.exists() and not _creatable(path):
            problems.append(f"{key}: {path} does not exist and cannot be created")
    for i, folder in enumerate(settings.retrieval.allowed_dirs):
        if not folder.is_dir():
            problems.append(f"retrieval.allowed_dirs[{i}]: {folder} is not a folder")
    return problems


def model_problems(settings: Settings) -> list[str]:
    """The seed bundle and the installed active model, loaded and verified."""
    problems = []
    if settings.model.bundle is not None:
        try:
            load_bundle(settings.model.bundle)
        except BundleError as exc:
            problems.append(f"model.bundle: {exc}")
    active = None
    if (settings.paths.state / "models").is_dir():  # never created by a check
        store = ModelStore.for_settings(settings)
        active = store.active_version()
        if active is not None:
            try:
                store.active()
            except BundleError as exc:
                problems.append(f"paths.state: installed model v{active} does not verify: "
                                f"{exc}")
    if active is None and settings.model.bundle is None:
        problems.append("model.bundle: not set and no model is installed under paths.state")
    return problems


def broker_problem(cfg: MQTTConfig, timeout: float = 10.0) -> str | None:
    """None when the broker at ``mqtt.host:port`` accepts this node's connection."""
    try:
        client = broker_client(cfg, f"terratile-check-{uuid.uuid4().hex[:8]}")
    except (OSError, ValueError) as exc:
        return f"mqtt: {exc}"
    answer: dict[str, str] = {}
    done = threading.Event()

    def on_connect(client: object, userdata: object, flags: object, reason: object,
                   props: object = None) -> None:
        answer["reason"] = str(reason)
        answer["ok"] = str(not getattr(reason, "is_failure", False))
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive)
    except OSError as exc:
        return f"mqtt.host: cannot reach {cfg.host}:{cfg.port}: {exc}"
    client.loop_start()
    try:
        if not done.wait(timeout):
            return f"mqtt.host: no answer from {cfg.host}:{cfg.port} within {timeout:g} s"
        if answer.get("ok") != "True":
            return (f"mqtt.username: the broker at {cfg.host}:{cfg.port} refused the "
                    f"connection: {answer.get('reason')}")
        return None
    finally:
        client.disconnect()
        client.loop_stop()


def problems(settings: Settings, connect: bool) -> list[str]:
    """Everything wrong with ``settings`` on this machine."""
    found = path_problems(settings) + model_problems(settings)
    if connect:
        problem = broker_problem(settings.mqtt)
        if problem is not None:
            found.append(problem)
    return found

