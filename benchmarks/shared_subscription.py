"""What a real mosquitto does with unacknowledged shared-subscription messages.

A fleet of boxes takes scene jobs from one MQTT 5 shared subscription
(``$share/<group>/<prefix>/jobs``) and acknowledges a job only once it is committed to its
journal. The design depends on what the broker does with a job a member received but never
acknowledged, so this script asks the broker rather than its documentation. Against a real
mosquitto (persistence on), two members A and B (persistent sessions, manual
acknowledgement, QoS 1, receive maximum 2) share a subscription; jobs are published; then:

1. ``member_killed_and_back``: A is SIGKILLed holding unacknowledged jobs, B keeps going,
   A reconnects with the same client id (session kept). Who gets A's jobs, and when?
2. ``member_killed_for_good``: A is SIGKILLed and never returns; its session expires
   (``SessionExpiryInterval`` 3 s). Are its jobs given to B, or lost?
3. ``receive_maximum``: how many unacknowledged jobs the broker hands one member at once
   (the back-pressure a box gets from ``fleet.max_inflight`` for free).

Members run in child processes so that a SIGKILL is a real crash (no DISCONNECT).

    .venv/bin/python benchmarks/shared_subscription.py \
        [--out benchmarks/results/shared_subscription.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.outbox import free_port, start_broker

TOPIC = "terratile/jobs"
SHARED = f"$share/boxes/{TOPIC}"


def start_mosquitto(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {tmp}/\nmax_queued_messages 100000\n")
    return start_broker(conf)


def member(port: int, client_id: str, ack: bool, expiry: int, log: Any) -> None:
    """A box: persistent session, manual acknowledgement, receive maximum 2."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5, manual_ack=True)

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        log.put((client_id, msg.payload.decode(), bool(msg.dup), time.monotonic()))
        if ack:
            time.sleep(0.05)  # "commit to the journal", then acknowledge
            c.ack(msg.mid, msg.qos)

    def on_connect(c: mqtt.Client, *args: Any) -> None:
        c.subscribe(SHARED, qos=1)

    client.on_message = on_message
    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    props.ReceiveMaximum = 2
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    client.loop_forever()


def publish(port: int, jobs: list[str]) -> None:
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    for job in jobs:
        pub.publish(TOPIC, job, qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()


def drain(log: Any, seconds: float) -> list[tuple[str, str, bool, float]]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            out.append(log.get(timeout=0.1))
        except Exception:  # queue.Empty from the multiprocessing queue
            continue
    return out


def scenario(back: bool) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    tmp = Path(tempfile.mkdtemp(prefix="share-"))
    port = free_port()
    broker = start_mosquitto(tmp, port)
    log = ctx.Queue()
    expiry = 300 if back else 3
    a = ctx.Process(target=member, args=(port, "box-a", False, expiry, log))
    a.start()
    time.sleep(0.5)
    b = ctx.Process(target=member, args=(port, "box-b", True, expiry, log))
    b.start()
    time.sleep(0.5)
    jobs = [f"job-{i}" for i in range(10)]
    publish(port, jobs)
    first = drain(log, 2.0)
    held_by_a = sorted(j for who, j, _, _ in first if who == "box-a")
    os.kill(a.pid or 0, signal.SIGKILL)
    a.join()
    killed = time.monotonic()
    after_kill = drain(log, 6.0)  # longer than the 3 s expiry of the second scenario
    share_of_a = sorted(jobs[0::2])  # round robin, A subscribed first (checked below)
    result: dict[str, Any] = {
        "jobs": len(jobs),
        "a_share_by_round_robin": share_of_a,
        "a_held_unacknowledged": held_by_a,
        "a_share_queued_in_its_session": sorted(set(share_of_a) - set(held_by_a)),
        "b_got_before_kill": sorted(j for who, j, _, _ in first if who == "box-b"),
        "b_got_a_jobs_after_kill": sorted(j for who, j, _, _ in after_kill
                                          if who == "box-b" and j in share_of_a),
    }
    if back:
        a2 = ctx.Process(target=member, args=(port, "box-a", True, expiry, log))
        a2.start()
        back_log = drain(log, 3.0)
        result["a_got_on_reconnect"] = sorted(j for who, j, _, _ in back_log if who == "box-a")
        result["a_redelivered_with_dup_flag"] = sorted(j for who, j, d, _ in back_log
                                                       if who == "box-a" and d)
        result["seconds_kill_to_redelivery"] = round(
            min((t for who, _, _, t in back_log if who == "box-a"), default=killed) - killed, 2)
        a2.kill()
        a2.join()
    else:
        # Does a fresh member that joins after A's session expired get A's jobs?
        c = ctx.Process(target=member, args=(port, "box-c", True, expiry, log))
        c.start()
        late = drain(log, 3.0)
        result["c_new_member_got_a_jobs"] = sorted(j for who, j, _, _ in late
                                                   if j in share_of_a)
        delivered_to_live = {j for who, j, _, _ in first + after_kill + late
                             if who != "box-a"}
        result["lost"] = sorted(set(jobs) - delivered_to_live)
        c.kill()
        c.join()
    b.kill()
    b.join()
    broker.terminate()
    broker.wait(10)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/shared_subscription.json"))
    args = ap.parse_args()
    version = subprocess.run([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"],
                             capture_output=True, text=True).stdout.splitlines()[0]
    result = {"broker": version, "receive_maximum": 2,
              "member_killed_and_back": scenario(back=True),
              "member_killed_for_good": scenario(back=False)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
