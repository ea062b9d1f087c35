"""pymongo with its default monitoring (the streaming hello protocol) against the simulator,
driven by tests/monitoring.rs.

Usage: monitor_pymongo.py URI SECONDS
  Writes {w: "majority"} once a second for SECONDS and prints
  "DONE failures=F awaited=A writes=W": heartbeat failures and streamed (awaited) heartbeats
  seen by a pymongo.monitoring.ServerHeartbeatListener. Each failure is printed too.
"""

import sys
import time

from pymongo import MongoClient, monitoring


class Heartbeats(monitoring.ServerHeartbeatListener):
    def __init__(self) -> None:
        self.failures = 0
        self.awaited = 0

    def started(self, event) -> None:
        pass

    def succeeded(self, event) -> None:
        if event.awaited:
            self.awaited += 1

    def failed(self, event) -> None:
        self.failures += 1
        print(f"HEARTBEAT_FAILED {event.connection_id}: {event.reply}", flush=True)


def main() -> int:
    uri, seconds = sys.argv[1], float(sys.argv[2])
    hb = Heartbeats()
    client = MongoClient(uri, event_listeners=[hb])
    coll = client.app.get_collection("pymon")
    writes = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        coll.insert_one({"n": writes})
        writes += 1
        time.sleep(1)
    print(f"DONE failures={hb.failures} awaited={hb.awaited} writes={writes}", flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
