// The Node.js driver (npm `mongodb`) against the simulator with its default monitoring (the
// streaming hello protocol), driven by sim/tests/node_driver.rs.
//
// Usage: node monitor.js URI QUIET_SECONDS AFTER_SECONDS
//   Connects with the driver's defaults and writes {w: "majority"} once a second. Prints:
//     PRIMARY host:port    once the first write succeeded
//     QUIET failures=F awaited=A pool_cleared=C
//                          after QUIET_SECONDS: heartbeat failures, streamed (awaited)
//                          heartbeats and pool clears so far
//   then reads a line on stdin (the Rust side SIGKILLs the primary first), writes for
//   AFTER_SECONDS more (a failed write is counted and the next one tried, as an application
//   would), and prints
//     DONE writes_after_kill=N writes=W count=C failed_hosts=h1,h2
//   Every heartbeat failure is printed too, as "HEARTBEAT_FAILED host: message".
"use strict";

const path = require("path");
const { MongoClient } = require(path.join(process.env.NODE_DRIVER_DIR, "node_modules", "mongodb"));

async function main() {
  const [uri, quietArg, afterArg] = process.argv.slice(2);
  const quietSeconds = Number(quietArg);
  const afterSeconds = Number(afterArg);
  const failedHosts = new Set();
  const client = new MongoClient(uri);
  let failures = 0;
  let awaited = 0;
  let poolCleared = 0;
  client.on("serverHeartbeatFailed", (e) => {
    failures += 1;
    failedHosts.add(e.connectionId);
    console.log(`HEARTBEAT_FAILED ${e.connectionId}: ${e.failure && e.failure.message}`);
  });
  client.on("serverHeartbeatSucceeded", (e) => {
    if (e.awaited) awaited += 1;
  });
  client.on("connectionPoolCleared", () => {
    poolCleared += 1;
  });
  await client.connect();
  const coll = client.db("app").collection("node", { writeConcern: { w: "majority" } });
  let writes = 0;
  let errors = 0;
  const write = async () => {
    try {
      await coll.insertOne({ n: writes });
      writes += 1;
      return true;
    } catch (e) {
      errors += 1;
      console.log(`WRITE_ERROR ${e.message}`);
      return false;
    }
  };
  while (!(await write())) {
    await new Promise((r) => setTimeout(r, 200));
  }
  const hello = await client.db("admin").command({ hello: 1 });
  console.log(`PRIMARY ${hello.primary}`);
  const run = async (secs) => {
    const end = Date.now() + secs * 1000;
    while (Date.now() < end) {
      await write();
      await new Promise((r) => setTimeout(r, 1000));
    }
  };
  await run(quietSeconds);
  console.log(`QUIET failures=${failures} awaited=${awaited} pool_cleared=${poolCleared}`);
  await new Promise((resolve) => process.stdin.once("data", resolve));
  const writesBefore = writes;
  await run(afterSeconds);
  const count = await client.db("app").collection("node").countDocuments({});
  console.log(
    `DONE writes_after_kill=${writes - writesBefore} writes=${writes} count=${count} failed_hosts=${[...failedHosts].join(",")}`,
  );
  await client.close();
}

main().then(
  () => process.exit(0),
  (e) => {
    console.log(`FAIL ${e.stack || e}`);
    process.exit(1);
  },
);
