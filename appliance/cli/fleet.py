"""``terratile fleet submit|status|query|install``: every box that shares the broker, from
one shell.

These commands speak to the broker only (``mqtt`` of the config: host, credentials, TLS,
``topic_prefix``); they need no box of their own and touch no local state. ``submit``
puts scene jobs on the shared work queue and holds a lease on each until it ends;
``status`` reads each node's retained ``available`` and ``status``; ``query`` sends one retrieval
request to every online node and merges the replies by score; ``install`` rolls a model
out through each node's ``cmd/install``, canary nodes first, and stops at the first
refusal.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer
from pydantic import ValidationError

from appliance.cli.index import (
    CLASS_OPTION,
    IMAGE_OPTION,
    K_OPTION,
    LABEL_OPTION,
    LONLAT_OPTION,
    PIXEL_OPTION,
    SCENE_FILTER_OPTION,
    SINCE_OPTION,
    UNTIL_OPTION,
    VECTOR_OPTION,
    query_request,
    read_vector,
)
from appliance.cli.options import CONFIG_OPTION, settings_or_exit
from appliance.contract.payloads import ModelRef
from appliance.fleet.link import FleetLink
from appliance.fleet.nodes import NodeView, read_fleet
from appliance.fleet.rollout import RolloutReport, roll_out
from appliance.fleet.scatter import FleetAnswer, scatter_query
from appliance.fleet.submit import JobTrack, SceneRequest, SubmitReport, submit_jobs

fleet_app = typer.Typer(no_args_is_help=True,
                        help="Every box that shares the broker, from one shell.")
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object.")
T = TypeVar("T")


def _on_fleet(config: Path | None, work: Callable[[FleetLink], T]) -> T:
    """Run ``work`` on a link to the config's broker; exit 1 with the reason when the
    broker cannot be reached or does not answer."""
    settings = settings_or_exit(config)
    try:
        with FleetLink(settings.mqtt) as link:
            return work(link)
    except (OSError, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


def _model(ref: ModelRef | None) -> str:
    if ref is None:
        return "-"
    return f"{ref.name} v{ref.version}" + (f" ({ref.domain})" if ref.domain else "")


def read_scene_list(path: Path) -> list[SceneRequest]:
    """One scene a line: a URL or shared path, optionally followed by its sha256; blank
    lines and ``#`` comments are skipped."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise ValueError(f"line {number}: a scene and at most one sha256")
        out.append(SceneRequest(words[0], words[1].lower() if len(words) == 2 else None))
    return out


@fleet_app.command("submit")
def submit(
    scenes: list[str] = typer.Argument(None, help="Scene URLs (https://, http://, s3://) or "
                                       "paths under the nodes' fleet.shared_dirs."),
    list_file: Path | None = typer.Option(None, "--list", help="A file of scenes, one a line "
                                          "(optionally followed by the scene's sha256)."),
    sha256: str | None = typer.Option(None, "--sha256", help="The sha256 of the one scene "
                                      "given (its identity instead of ETag/size/date)."),
    lease: float = typer.Option(600.0, "--lease", min=1.0,
                                help="Seconds a job may go without news (since it was sent "
                                "or accepted) before it is submitted again; longer than "
                                "a scene takes."),
    timeout: float | None = typer.Option(None, "--timeout", min=1.0,
                                         help="Give up after this many seconds (default: "
                                         "wait until every job has ended)."),
    window: int = typer.Option(64, "--window", min=1,
                               help="Jobs sent and not yet accepted at once; the rest of "
                               "the list waits here."),
    topic: str | None = typer.Option(None, "--topic",
                                     help="Publish the jobs here instead of <prefix>/jobs, "
                                     "e.g. one site's jobs topic at a central broker."),
    config: Path = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Put scenes on the fleet's work queue; follow every job until it is done or failed.

    Prints each job's progress on stderr and a summary; exit 1 unless every job is done."""
    try:
        requests = read_scene_list(list_file) if list_file is not None else []
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {list_file}: {exc}", err=True)
        raise typer.Exit(2) from exc
    if sha256 is not None and (len(scenes or []) != 1 or requests):
        typer.echo("error: --sha256 goes with exactly one scene argument", err=True)
        raise typer.Exit(2)
    requests += [SceneRequest(s, sha256.lower() if sha256 else None) for s in scenes or []]
    if not requests:
        typer.echo("error: no scene given (arguments or --list)", err=True)
        raise typer.Exit(2)
    if topic is not None and (not topic or topic.startswith("$") or "+" in topic
                              or "#" in topic):
        typer.echo(f"error: --topic {topic!r}: a topic to publish on (no wildcards, no $)",
                   err=True)
        raise typer.Exit(2)

    def told(track: JobTrack, what: str) -> None:
        why = f" ({track.reason}: {track.message})" if what == "failed" else ""
        by = f" by {track.node}" if track.node else ""
        typer.echo(f"{track.job.job_id} {what}{by}{why}  {track.job.scene}", err=True)

    try:
        report: SubmitReport = _on_fleet(
            config, lambda link: submit_jobs(link, requests, lease, timeout, told, window, topic))
    except ValidationError as exc:  # a scene reference or digest the job schema refuses
        typer.echo(f"error: {exc.errors()[0]['msg']}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
    else:
        typer.echo(f"{'JOB':<16} {'STATE':<10} {'NODE':<16} SCENE")
        for j in report.jobs:
            typer.echo(f"{j.job.job_id:<16} {j.state:<10} {j.node or '-':<16} {j.job.scene}"
                       + (f"  ({j.reason})" if j.reason else ""))
        typer.echo(f"{report.count('done')} done, {report.count('failed')} failed, "
                   f"{report.count('unfinished')} unfinished in {report.seconds:.1f} s",
                   err=True)
    if not report.complete:
        raise typer.Exit(1)


@fleet_app.command("status")
def status(config: Path = CONFIG_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Every node under the prefix, from its retained availability and status."""
    nodes = _on_fleet(config, read_fleet)
    if as_json:
        typer.echo(json.dumps({"nodes": [n.as_dict() for n in nodes]}))
        return
    if not nodes:
        typer.echo("no node has published under this prefix")
        return
    typer.echo(f"{'NODE':<16} {'AVAILABLE':<9} {'STATE':<10} {'MODEL':<24} {'QUEUE':>5} "
               f"{'OUTBOX':>6} {'DEGRADED':<10} LAST SEEN")
    for n in nodes:
        s = n.status
        typer.echo(f"{n.node_id:<16} {n.available or '?':<9} {s.state if s else '?':<10} "
                   f"{_model(s.model if s else None):<24} "
                   f"{s.queue_depth if s else '-':>5} {s.outbox_depth if s else '-':>6} "
                   f"{','.join(s.degraded) if s and s.degraded else '-':<10} "
                   f"{n.last_seen or '-'}")
        if n.status_error:
            typer.echo(f"  {n.node_id}: {n.status_error}", err=True)


@fleet_app.command("query")
def query(
    config: Path = CONFIG_OPTION,
    image: Path | None = IMAGE_OPTION,
    scene: str | None = typer.Option(None, "--scene",
                                     help="Query by a cell of this scene (its full id)."),
    pixel: tuple[float, float] | None = PIXEL_OPTION,
    lonlat: tuple[float, float] | None = LONLAT_OPTION,
    vector_file: Path | None = VECTOR_OPTION,
    k: int = K_OPTION,
    class_name: str | None = CLASS_OPTION,
    scene_filter: str | None = SCENE_FILTER_OPTION,
    since: str | None = SINCE_OPTION,
    until: str | None = UNTIL_OPTION,
    label: list[str] | None = LABEL_OPTION,
    timeout: float = typer.Option(5.0, "--timeout", min=0.1,
                                  help="Seconds to wait for the nodes' answers."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Ask every online node; the k best results of all, each naming its node.

    An --image path is read on each node (inside its retrieval.allowed_dirs). Nodes that
    stay silent or answer with an error are named on stderr; exit 1 when none answered."""
    try:
        vector = read_vector(vector_file).tolist() if vector_file else None
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {vector_file}: {exc}", err=True)
        raise typer.Exit(1) from exc
    request = query_request(image, scene, pixel, lonlat, vector, k, class_name, scene_filter,
                            since, until, label or [])

    def ask(link: FleetLink) -> tuple[list[NodeView], FleetAnswer]:
        nodes = read_fleet(link)
        online = [n.node_id for n in nodes if n.online]
        return nodes, scatter_query(link, online, request, timeout)

    nodes, answer = _on_fleet(config, ask)
    if as_json:
        typer.echo(json.dumps(answer.as_dict()))
    else:
        for rank, row in enumerate(answer.results, 1):
            window = row.get("window") or ""
            typer.echo(f"{rank:3d}  {row['score']:.4f}  {row['node_id']:<16} "
                       f"{row.get('class') or '-':<20} {row.get('source')}  {window}")
    offline = [n.node_id for n in nodes if not n.online]
    if offline:
        typer.echo(f"not asked (offline): {', '.join(offline)}", err=True)
    for node in answer.silent:
        typer.echo(f"silent: {node} did not answer within {timeout:g} s", err=True)
    for node, error in answer.errors.items():
        typer.echo(f"error from {node} ({error.get('code')}): {error.get('message')}", err=True)
    if not answer.asked:
        typer.echo("no node is online", err=True)
    if not answer.answered:
        raise typer.Exit(1)


@fleet_app.command("install")
def install(
    bundle_url: str = typer.Argument(..., help="http(s) URL of the bundle archive; every "
                                     "node downloads it itself."),
    sha256: str | None = typer.Option(
        None, "--sha256", help="sha256 of the bundle's manifest.json (pins every file); "
        "without it a node installs whatever the URL serves."),
    nodes_option: str | None = typer.Option(
        None, "--nodes", help="Comma-separated node ids, in rollout order (default: every "
        "online node)."),
    canary: int = typer.Option(1, "--canary", min=0,
                               help="Nodes installed one at a time before all the others."),
    timeout: float = typer.Option(600.0, "--timeout", min=1.0,
                                  help="Seconds each wave may take (download, checks, "
                                  "warm-up)."),
    config: Path = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Roll the bundle at BUNDLE_URL out through each node's cmd/install.

    Canary nodes go first, one at a time, then the rest together; the rollout stops at
    the first refusal or silence. Prints which node runs which model; exit 1 unless
    every node installed it."""
    if not bundle_url.startswith(("http://", "https://")):
        typer.echo(f"error: {bundle_url}: the nodes fetch the bundle themselves, so give "
                   "an http(s) URL they can reach", err=True)
        raise typer.Exit(1)
    if sha256 is None:
        typer.echo("warning: no --sha256: the nodes cannot tell this bundle from another "
                   "served at the same URL", err=True)
    wanted = [n.strip() for n in nodes_option.split(",") if n.strip()] if nodes_option else None

    def run(link: FleetLink) -> RolloutReport:
        fleet = {n.node_id: n for n in read_fleet(link)}
        targets = wanted if wanted is not None else sorted(n for n in fleet
                                                           if fleet[n].online)
        unready = [f"{n} ({'offline' if n in fleet else 'unknown'})"
                   for n in targets if n not in fleet or not fleet[n].online]
        if unready or not targets:
            raise _Refused(f"not online: {', '.join(unready)}" if unready
                           else "no node is online")
        current = {n: (s.model if (s := fleet[n].status) is not None else None)
                   for n in targets}
        return roll_out(link, targets, current, bundle_url, sha256, canary, timeout)

    try:
        report = _on_fleet(config, run)
    except _Refused as exc:
        typer.echo(f"error: {exc}; nothing was sent", err=True)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
    else:
        typer.echo(f"{'NODE':<16} {'OUTCOME':<10} {'MODEL NOW':<24} REASON")
        for n in report.nodes:
            typer.echo(f"{n.node_id:<16} {n.outcome:<10} {_model(n.model):<24} "
                       f"{n.reason or ''}")
    if report.stopped:
        typer.echo(f"stopped at {report.stopped}", err=True)
    if not report.complete:
        raise typer.Exit(1)


class _Refused(Exception):
    """The rollout cannot start; nothing was sent."""
