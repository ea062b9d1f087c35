"""pymongo against the simulator, driven by tests/pymongo.rs.

Usage: test_pymongo.py HOSTS SETNAME
  HOSTS is "h1:p1,h2:p2,h3:p3". The script discovers the set as the seed did with a real
  one (MongoClient(replicaset=...) and client.nodes), writes with w:majority, prints
  "PRIMARY host:port", waits for a line on stdin (the Rust side kills that primary), then
  finds the new primary, checks the write survived and prints "NEWPRIMARY host:port".
"""

import sys
import time

from pymongo import MongoClient, WriteConcern
from pymongo.errors import (
    AutoReconnect,
    DuplicateKeyError,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
)

# Codes a client may see while a set changes primary (PrimarySteppedDown,
# InterruptedDueToReplStateChange, NotWritablePrimary): retry them, as an application would.
TRANSIENT_CODES = {189, 11602, 10107}


def main() -> int:
    hosts, set_name = sys.argv[1], sys.argv[2]
    expected = {tuple([h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])]) for h in hosts.split(",")}
    client = MongoClient(
        hosts.split(","),
        replicaset=set_name,
        serverSelectionTimeoutMS=20000,
        heartbeatFrequencyMS=500,
    )
    client.admin.command("ping")
    deadline = time.monotonic() + 20
    while set(client.nodes) != expected:
        if time.monotonic() > deadline:
            print(f"FAIL nodes {client.nodes} != {expected}", flush=True)
            return 1
        time.sleep(0.05)

    hello = client.admin.command("hello")
    assert hello["setName"] == set_name, hello
    assert hello["isWritablePrimary"] is True, hello

    coll = client.app.get_collection(
        "py", write_concern=WriteConcern(w="majority", wtimeout=10000)
    )
    coll.insert_one({"_id": "before"})
    old = client.primary
    print("PRIMARY %s:%d" % old, flush=True)

    sys.stdin.readline()  # the primary is gone now

    deadline = time.monotonic() + 30
    while True:
        try:
            coll.insert_one({"_id": "after"})
            break
        except DuplicateKeyError:
            # An earlier attempt did insert it (the simulator does not de-duplicate retried
            # writes by txnNumber, see docs/replset-sim.md).
            break
        except (AutoReconnect, NotPrimaryError, ServerSelectionTimeoutError, OperationFailure) as e:
            if isinstance(e, OperationFailure) and not isinstance(e, NotPrimaryError):
                if e.code not in TRANSIENT_CODES:
                    raise
            if time.monotonic() > deadline:
                print(f"FAIL no new primary: {e}", flush=True)
                return 1
            time.sleep(0.1)
    new = client.primary
    if new == old or new is None:
        print(f"FAIL primary did not change: {old} -> {new}", flush=True)
        return 1
    doc = coll.find_one({"_id": "before"})
    if doc is None:
        print("FAIL the majority write is gone", flush=True)
        return 1
    print("NEWPRIMARY %s:%d" % new, flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
