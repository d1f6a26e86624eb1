"""A stand-in Ferry service for the stack tests: a real process speaking real MQTT.

It reads the ferry.toml the stack wrote (so it proves the chosen broker port reaches services),
publishes a retained ``{"status": "online"}`` on its topic, and on SIGTERM publishes
``offline`` and exits — the contract every real Ferry service keeps. ``--fail MESSAGE`` makes it
print MESSAGE and exit 3 instead, to test how the stack reports a service that dies.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from services.common.config import load_config


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--fail")
    args = parser.parse_args()
    if args.fail:
        print(args.fail, file=sys.stderr)
        return 3
    broker = load_config(args.config).broker
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.will_set(args.topic, json.dumps({"status": "offline"}), qos=1, retain=True)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(args.topic, json.dumps({"status": "online"}), qos=1, retain=True)
    print(f"online on {broker.host}:{broker.port}", flush=True)
    stop.wait()
    offline = client.publish(args.topic, json.dumps({"status": "offline"}), qos=1, retain=True)
    offline.wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
