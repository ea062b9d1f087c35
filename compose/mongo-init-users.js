// Creates the users of the stack on a member's first start. The mongo image's entrypoint runs
// the files of /docker-entrypoint-initdb.d with mongosh, authenticated as the root user
// (MONGO_INITDB_ROOT_USERNAME), while mongod runs without --replSet on an empty data directory;
// the stack mounts this file there. MONGO_INITDB_USERS_FILE names a JSON file
// (compose/mongo-users.json):
//
//   {"users": [{"user": "...", "db": "...", "roles": [{"role": "...", "db": "..."}],
//               "passwordFile": "/run/secrets/..."}]}
//
// Each password is the first line of its file (a Docker secret). Nothing is printed but the
// names. The replica-set simulator (local/mongo-sim) reads the same file itself.
const fs = require('fs');
const file = process.env.MONGO_INITDB_USERS_FILE;
if (file) {
  const { users } = JSON.parse(fs.readFileSync(file, 'utf8'));
  for (const u of users) {
    const pwd = fs.readFileSync(u.passwordFile, 'utf8').split(/\r?\n/)[0];
    if (!pwd) {
      throw new Error(`the password file ${u.passwordFile} of user ${u.user} is empty`);
    }
    db.getSiblingDB(u.db).createUser({ user: u.user, pwd: pwd, roles: u.roles });
    print(`created user ${u.user}@${u.db}`);
  }
}
