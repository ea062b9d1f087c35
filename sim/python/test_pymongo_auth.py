"""pymongo's SCRAM against a simulated set with authorization, driven by tests/pymongo.rs.

Usage: test_pymongo_auth.py HOSTS SETNAME
  The Rust side has created the root user "admin" / "adminpw". The script logs in with
  SCRAM-SHA-256 and SCRAM-SHA-1, checks that a wrong password is AuthenticationFailed (18),
  creates a readWrite user of "shop" and checks that it may write there and gets Unauthorized
  (13) elsewhere. Prints "OK" at the end; any failure is an exception (exit status 1).
"""

import sys

from pymongo import MongoClient
from pymongo.errors import OperationFailure


def client(hosts, set_name, user, password, source, mechanism):
    return MongoClient(
        f"mongodb://{hosts}/?replicaSet={set_name}",
        username=user,
        password=password,
        authSource=source,
        authMechanism=mechanism,
        serverSelectionTimeoutMS=15000,
    )


def expect_code(code, fn):
    try:
        fn()
    except OperationFailure as e:
        assert e.code == code, f"expected code {code}, got {e.code}: {e}"
        return
    raise AssertionError(f"expected code {code}, got success")


def main() -> int:
    hosts, set_name = sys.argv[1], sys.argv[2]
    for mech in ("SCRAM-SHA-256", "SCRAM-SHA-1"):
        root = client(hosts, set_name, "admin", "adminpw", "admin", mech)
        status = root.admin.command("connectionStatus")
        users = status["authInfo"]["authenticatedUsers"]
        assert users == [{"user": "admin", "db": "admin"}], (mech, status)
        root.admin.command("replSetGetStatus")
        bad = client(hosts, set_name, "admin", "nope", "admin", mech)
        expect_code(18, lambda: bad.admin.command("ping"))

    root = client(hosts, set_name, "admin", "adminpw", "admin", "SCRAM-SHA-256")
    root.shop.command("createUser", "py", pwd="pypw", roles=["readWrite"])
    app = client(hosts, set_name, "py", "pypw", "shop", "SCRAM-SHA-256")
    app.shop.orders.insert_one({"item": "tea"})
    assert app.shop.orders.count_documents({}) == 1
    expect_code(13, lambda: app.other.orders.insert_one({"item": "x"}))
    expect_code(13, lambda: app.admin.command("replSetGetStatus"))
    print("OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
