"""``evse-server ota``: push a signed update to one charger and follow it.

The server serves the bundle over HTTP (:func:`evse_tools.ota.serve`),
publishes ``{"v": 1, "cmd": "ota", "url": ..., "version": ...}`` on the
charger's ``cmd`` topic, and follows the charger's state messages (``ota``:
``deferred`` while a car charges, ``running``, ``switched``, then ``fw`` =
the new version after its reboot) until the new version reports or the
timeout passes. The bundle is checked against the public key before anything
is sent.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from evse_tools import ota


def push(bundle: Path, member: str, broker: tuple[str, int], prefix: str = "evse",
         http_host: str = "127.0.0.1", http_port: int = 0, pubkey: Path | None = None,
         timeout_s: float = 600.0, out=print, configure=None) -> int:
    """Push ``bundle`` to charger ``member``; return 0 once it reports the new
    version, 1 on a refusal, a failure reported by the charger, or a timeout.
    ``http_host`` must be an address the charger can reach. ``configure(client)``
    (optional) sets the paho client's account and TLS options."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    body = json.loads(manifest["body"])
    version = body["version"]
    if pubkey is not None:
        ota.verify(bundle, pubkey)
    server, base = ota.serve(bundle.parent, http_host, http_port)
    url = f"{base.rstrip('/')}/{bundle.name}/"
    states: list[dict] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"evse-ota-{int(time.time())}")
    if configure is not None:
        configure(client)

    def on_message(c, u, msg):
        try:
            states.append(json.loads(msg.payload))
        except ValueError:
            pass

    client.on_message = on_message
    client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"{prefix}/{member}/state", 1)
    try:
        client.connect(broker[0], broker[1], keepalive=30)
        client.loop_start()
        time.sleep(0.5)
        cmd = {"v": 1, "cmd": "ota", "url": url, "version": version}
        client.publish(f"{prefix}/{member}/cmd", json.dumps(cmd), qos=1).wait_for_publish(10)
        out(f"ota {version} -> {member}: bundle at {url}")
        end = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < end:
            time.sleep(0.2)
            while states:
                st = states.pop(0)
                seen = (st.get("fw"), st.get("ota"), st.get("state"))
                if seen != last:
                    last = seen
                    out(f"  {member}: fw {st.get('fw')} ota {st.get('ota')} state {st.get('state')}")
                if st.get("fw") == version:
                    out(f"ota {version}: {member} runs it")
                    return 0
                if st.get("ota") == "failed":
                    out(f"ota {version}: {member} refused or failed the update (see its log)")
                    return 1
        out(f"ota {version}: {member} did not report the new version within {timeout_s:g} s")
        return 1
    finally:
        client.loop_stop()
        client.disconnect()
        server.shutdown()
