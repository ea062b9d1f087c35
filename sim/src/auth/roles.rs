//! The built-in roles operators use and the privileges each command needs, after MongoDB's
//! src/mongo/db/auth/builtin_roles.yml (builtin_roles.cpp before 6.0) and each command's
//! `checkAuthForOperation`; the manual's "Built-In Roles" page lists the same actions.
//!
//! A privilege is an action on a resource: a database (every collection in it) or the
//! cluster. The simulator keeps MongoDB's action names for the ones it checks.

/// What a privilege applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Database(String),
    /// One collection, for the reads that name theirs (`find`, `count`, `distinct`,
    /// `aggregate`, `getMore`). A grant on a database reaches its collections except the
    /// `system.*` ones, which only grants on that exact namespace reach (MongoDB's
    /// `matchType: database` against `exact_namespace`).
    Collection(String, String),
    Cluster,
}

/// MongoDB's `ActionType`s that the simulator checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Find,
    Insert,
    Update,
    Remove,
    CreateCollection,
    DropCollection,
    CreateIndex,
    DropIndex,
    ListCollections,
    ListIndexes,
    DbStats,
    CollStats,
    DropDatabase,
    /// The user administration actions (`userAdmin`), reading users first.
    ViewUser,
    CreateUser,
    DropUser,
    GrantRole,
    ChangePassword,
    ChangeCustomData,
    ListDatabases,
    ReplSetGetStatus,
    ReplSetGetConfig,
    ReplSetConfigure,
    ReplSetStateChange,
    GetDefaultRWConcern,
    SetDefaultRWConcern,
    ServerStatus,
    GetCmdLineOpts,
    GetLog,
    HostInfo,
    GetParameter,
    Shutdown,
    /// Member-to-member commands (heartbeats, votes, position updates); only `__system`.
    Internal,
}

use Action::*;

/// Reading a database's metadata: in `read`, and in `dbAdmin`.
const METADATA: &[Action] = &[ListCollections, ListIndexes, DbStats, CollStats];
/// Creating and dropping collections and indexes: in `readWrite`, and in `dbAdmin`.
const DDL: &[Action] = &[CreateCollection, DropCollection, CreateIndex, DropIndex];
const USER_ADMIN: &[Action] = &[
    CreateUser,
    DropUser,
    GrantRole,
    ViewUser,
    ChangePassword,
    ChangeCustomData,
];
const CLUSTER_MONITOR: &[Action] = &[
    GetDefaultRWConcern,
    ReplSetGetStatus,
    ReplSetGetConfig,
    ServerStatus,
    GetCmdLineOpts,
    GetLog,
    HostInfo,
    GetParameter,
    ListDatabases,
];
const CLUSTER_MANAGER: &[Action] = &[
    ReplSetConfigure,
    ReplSetStateChange,
    ReplSetGetConfig,
    ReplSetGetStatus,
    GetDefaultRWConcern,
    SetDefaultRWConcern,
];

/// The built-in roles the simulator knows; the `*AnyDatabase` and cluster roles exist only
/// in `admin` (elsewhere they are RoleNotFound, as on mongod).
pub const BUILTIN_ROLES: &[&str] = &[
    "read",
    "readWrite",
    "dbAdmin",
    "userAdmin",
    "dbOwner",
    "readAnyDatabase",
    "readWriteAnyDatabase",
    "userAdminAnyDatabase",
    "dbAdminAnyDatabase",
    "clusterMonitor",
    "clusterManager",
    "hostManager",
    "clusterAdmin",
    "root",
    "__system",
];

/// Whether `role@db` is a built-in role.
pub fn is_builtin(role: &str, db: &str) -> bool {
    match role {
        "read" | "readWrite" | "dbAdmin" | "userAdmin" | "dbOwner" => true,
        r => db == "admin" && BUILTIN_ROLES.contains(&r),
    }
}

/// `local` and `config` are not "normal" databases: the `*AnyDatabase` roles do not reach
/// them (ResourcePattern::forAnyNormalResource).
fn is_normal_db(db: &str) -> bool {
    db != "local" && db != "config"
}

/// Whether `role@role_db` grants `action` on `resource`.
pub fn role_grants(role: &str, role_db: &str, action: Action, resource: &Resource) -> bool {
    if !is_builtin(role, role_db) {
        return false;
    }
    match resource {
        Resource::Collection(db, coll) if coll.starts_with("system.") => {
            role_grants_on_system_collection(role, role_db, action, db, coll)
        }
        Resource::Collection(db, _) => {
            role_grants_on_database(role, role_db, action, &Resource::Database(db.clone()))
        }
        _ => role_grants_on_database(role, role_db, action, resource),
    }
}

/// The grants on one `system.*` collection: only roles that name it (or everything).
fn role_grants_on_system_collection(
    role: &str,
    role_db: &str,
    action: Action,
    db: &str,
    coll: &str,
) -> bool {
    let read = action == Find || METADATA.contains(&action);
    match role {
        "__system" => true,
        "root" => action != Internal,
        "read" | "readWrite" | "dbOwner" => db == role_db && coll == "system.js" && read,
        "readAnyDatabase" | "readWriteAnyDatabase" => {
            is_normal_db(db) && coll == "system.js" && read
        }
        "clusterManager" | "clusterAdmin" if db == "local" && coll == "system.replset" => read,
        "clusterMonitor" => db == "local" && coll == "system.replset" && action == Find,
        "userAdminAnyDatabase" => {
            db == "admin" && (coll == "system.users" || coll == "system.roles") && read
        }
        _ => false,
    }
}

/// The grants on a database (its non-system collections) or on the cluster.
fn role_grants_on_database(role: &str, role_db: &str, action: Action, resource: &Resource) -> bool {
    let on_own_db = matches!(resource, Resource::Database(d) if d == role_db);
    let on_normal_db = matches!(resource, Resource::Database(d) if is_normal_db(d));
    let on_cluster = *resource == Resource::Cluster;
    let on_config = matches!(resource, Resource::Database(d) if d == "config");
    let on_local_or_config =
        matches!(resource, Resource::Database(d) if d == "local" || d == "config");
    let has = |set: &[Action]| set.contains(&action);
    let read = action == Find || has(METADATA);
    let write = has(&[Insert, Update, Remove]) || has(DDL);
    let db_admin = has(METADATA) || has(DDL) || action == DropDatabase;
    match role {
        "__system" => true,
        // root: readWriteAnyDatabase, dbAdminAnyDatabase, userAdminAnyDatabase, clusterAdmin,
        // backup and restore: everything but the internal action.
        "root" => action != Internal,
        "read" => on_own_db && read,
        "readWrite" => on_own_db && (read || write),
        "dbAdmin" => on_own_db && db_admin,
        "userAdmin" => on_own_db && has(USER_ADMIN),
        "dbOwner" => on_own_db && (read || write || db_admin || has(USER_ADMIN)),
        "readAnyDatabase" => (on_normal_db && read) || (on_cluster && action == ListDatabases),
        "readWriteAnyDatabase" => {
            (on_normal_db && (read || write)) || (on_cluster && action == ListDatabases)
        }
        "userAdminAnyDatabase" => {
            (matches!(resource, Resource::Database(_)) && has(USER_ADMIN))
                || (on_cluster && action == ListDatabases)
        }
        "dbAdminAnyDatabase" => {
            (on_normal_db && db_admin) || (on_cluster && action == ListDatabases)
        }
        // clusterMonitor holds read@local and read@config (the oplog among them);
        // clusterManager read@config and the writes on local, but reads on local only
        // local.system.replset (builtin_roles.yml).
        "clusterMonitor" => (on_cluster && has(CLUSTER_MONITOR)) || (on_local_or_config && read),
        "clusterManager" => {
            (on_cluster && has(CLUSTER_MANAGER))
                || (on_config && read)
                || (on_local_or_config && has(&[Insert, Update, Remove]))
        }
        "hostManager" => on_cluster && action == Shutdown,
        // clusterAdmin: clusterManager + clusterMonitor + hostManager, and dropDatabase
        // everywhere.
        "clusterAdmin" => {
            (on_cluster && (has(CLUSTER_MONITOR) || has(CLUSTER_MANAGER) || action == Shutdown))
                || (on_local_or_config && (read || has(&[Insert, Update, Remove])))
                || (matches!(resource, Resource::Database(_)) && action == DropDatabase)
        }
        _ => false,
    }
}

/// A privilege a command needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privilege {
    pub resource: Resource,
    pub action: Action,
}

impl Privilege {
    pub fn on_db(db: &str, action: Action) -> Privilege {
        Privilege {
            resource: Resource::Database(db.to_string()),
            action,
        }
    }
    pub fn on_cluster(action: Action) -> Privilege {
        Privilege {
            resource: Resource::Cluster,
            action,
        }
    }
}

/// What a command asks of the client before it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `requiresAuth() == false`: the handshake, ping, buildInfo, the SASL commands.
    None,
    /// Any authenticated user; the command itself limits what it shows (listDatabases with
    /// `authorizedDatabases`, usersInfo on oneself, killCursors of one's own cursors).
    Authenticated,
    Privileges(Vec<Privilege>),
    /// A command the member does not have: CommandNotFound (59) before any check, as mongod
    /// looks the command up before it checks authorization.
    UnknownCommand,
}

/// The privileges of command `name` with `body`, run on database `db`.
pub fn requirement(name: &str, body: &bson::Document, db: &str) -> Requirement {
    let on = |a: Action| Requirement::Privileges(vec![Privilege::on_db(db, a)]);
    // The reads that name their collection are checked on it.
    let read_of = |field: &str| {
        let resource = match body.get_str(field) {
            Ok(coll) => Resource::Collection(db.to_string(), coll.to_string()),
            Err(_) => Resource::Database(db.to_string()),
        };
        Requirement::Privileges(vec![Privilege {
            resource,
            action: Find,
        }])
    };
    let cluster = |a: Action| Requirement::Privileges(vec![Privilege::on_cluster(a)]);
    match name {
        "hello" | "isMaster" | "ismaster" | "ping" | "buildInfo" | "buildinfo" | "saslStart"
        | "saslContinue" | "authenticate" | "logout" | "connectionStatus" | "getnonce"
        | "endSessions" | "listCommands" | "whatsmyuri" => Requirement::None,
        "find" | "count" | "distinct" | "aggregate" => read_of(name),
        "getMore" => read_of("collection"),
        "insert" => on(Insert),
        "update" => {
            let upsert = body
                .get_array("updates")
                .map(|u| {
                    u.iter().any(|s| {
                        s.as_document()
                            .is_some_and(|d| d.get_bool("upsert").unwrap_or(false))
                    })
                })
                .unwrap_or(false);
            let mut p = vec![Privilege::on_db(db, Update)];
            if upsert {
                p.push(Privilege::on_db(db, Insert));
            }
            Requirement::Privileges(p)
        }
        "delete" => on(Remove),
        "findAndModify" | "findandmodify" => {
            let mut p = vec![Privilege::on_db(db, Find)];
            if body.get_bool("remove").unwrap_or(false) {
                p.push(Privilege::on_db(db, Remove));
            } else {
                p.push(Privilege::on_db(db, Update));
                if body.get_bool("upsert").unwrap_or(false) {
                    p.push(Privilege::on_db(db, Insert));
                }
            }
            Requirement::Privileges(p)
        }
        "create" => on(CreateCollection),
        "drop" => on(DropCollection),
        "dropDatabase" => on(DropDatabase),
        "createIndexes" => on(CreateIndex),
        "dropIndexes" => on(DropIndex),
        "listIndexes" => on(ListIndexes),
        "listCollections" => on(ListCollections),
        "dbStats" | "dbstats" => on(DbStats),
        "collStats" => on(CollStats),
        "createUser" => {
            let mut p = vec![Privilege::on_db(db, CreateUser)];
            p.extend(grant_privileges(body, db));
            Requirement::Privileges(p)
        }
        "updateUser" => {
            let mut p = Vec::new();
            if body.contains_key("pwd") {
                p.push(Privilege::on_db(db, ChangePassword));
            }
            if body.contains_key("customData") {
                p.push(Privilege::on_db(db, ChangeCustomData));
            }
            p.extend(grant_privileges(body, db));
            if p.is_empty() {
                p.push(Privilege::on_db(db, ChangePassword));
            }
            Requirement::Privileges(p)
        }
        "dropUser" => on(DropUser),
        "grantRolesToUser" => Requirement::Privileges(grant_privileges(body, db)),
        "usersInfo" => Requirement::Authenticated,
        "listDatabases" => Requirement::Authenticated,
        "killCursors" => Requirement::Authenticated,
        "killSessions" | "refreshSessions" => Requirement::Authenticated,
        "replSetGetStatus" => cluster(ReplSetGetStatus),
        "replSetGetConfig" => cluster(ReplSetGetConfig),
        "replSetInitiate" | "replSetReconfig" => cluster(ReplSetConfigure),
        "replSetStepDown" | "replSetStepUp" | "replSetFreeze" | "replSetMaintenance" => {
            cluster(ReplSetStateChange)
        }
        "serverStatus" => cluster(ServerStatus),
        "getCmdLineOpts" => cluster(GetCmdLineOpts),
        "getLog" => cluster(GetLog),
        "hostInfo" => cluster(HostInfo),
        "getParameter" => cluster(GetParameter),
        "shutdown" => cluster(Shutdown),
        "getDefaultRWConcern" => cluster(GetDefaultRWConcern),
        "setDefaultRWConcern" => cluster(SetDefaultRWConcern),
        "commitTransaction" | "abortTransaction" => Requirement::Authenticated,
        "replSetHeartbeat" | "replSetRequestVotes" | "replSetUpdatePosition" | "_isSelf" => {
            cluster(Internal)
        }
        // commands/mod.rs has a test that every command it dispatches is listed above.
        _ => Requirement::UnknownCommand,
    }
}

/// `grantRole` on the database of every role in `body.roles` (createUser, updateUser,
/// grantRolesToUser).
fn grant_privileges(body: &bson::Document, db: &str) -> Vec<Privilege> {
    body.get_array("roles")
        .map(|roles| {
            roles
                .iter()
                .map(|r| {
                    let role_db = match r {
                        bson::Bson::Document(d) => d.get_str("db").unwrap_or(db),
                        _ => db,
                    };
                    Privilege::on_db(role_db, GrantRole)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The privileges the localhost exception grants while no user exists
/// (AuthorizationSessionImpl::_getDefaultPrivileges): createUser and grantRole on `admin`,
/// replSetConfigure and replSetGetStatus on the cluster.
pub fn localhost_exception_allows(p: &Privilege) -> bool {
    match (&p.resource, p.action) {
        (Resource::Database(d), CreateUser | GrantRole) => d == "admin",
        (Resource::Cluster, ReplSetConfigure | ReplSetGetStatus) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(d: &str) -> Resource {
        Resource::Database(d.into())
    }

    #[test]
    fn database_roles_stay_in_their_database() {
        assert!(role_grants("readWrite", "app", Insert, &db("app")));
        assert!(!role_grants("readWrite", "app", Insert, &db("other")));
        assert!(!role_grants("read", "app", Insert, &db("app")));
        assert!(role_grants("read", "app", Find, &db("app")));
        assert!(!role_grants("readWrite", "app", DropDatabase, &db("app")));
        assert!(!role_grants(
            "readWrite",
            "app",
            ReplSetGetStatus,
            &Resource::Cluster
        ));
    }

    #[test]
    fn any_database_and_cluster_roles_exist_only_in_admin() {
        assert!(role_grants(
            "readWriteAnyDatabase",
            "admin",
            Insert,
            &db("app")
        ));
        assert!(!role_grants(
            "readWriteAnyDatabase",
            "admin",
            Insert,
            &db("local")
        ));
        assert!(!role_grants(
            "readWriteAnyDatabase",
            "app",
            Insert,
            &db("app")
        ));
        assert!(!is_builtin("root", "app"));
        assert!(role_grants(
            "clusterMonitor",
            "admin",
            ReplSetGetStatus,
            &Resource::Cluster
        ));
        assert!(!role_grants(
            "clusterMonitor",
            "admin",
            ReplSetConfigure,
            &Resource::Cluster
        ));
        assert!(role_grants(
            "clusterAdmin",
            "admin",
            ReplSetConfigure,
            &Resource::Cluster
        ));
        assert!(!role_grants("clusterAdmin", "admin", Find, &db("app")));
        assert!(role_grants(
            "userAdminAnyDatabase",
            "admin",
            CreateUser,
            &db("app")
        ));
        assert!(!role_grants(
            "userAdminAnyDatabase",
            "admin",
            Find,
            &db("app")
        ));
    }

    fn coll(d: &str, c: &str) -> Resource {
        Resource::Collection(d.into(), c.into())
    }

    /// builtin_roles.yml: clusterManager configures the set and reads its status and config,
    /// but of `local` it reads only `system.replset`; the oplog is read through
    /// clusterMonitor's `read@local`.
    #[test]
    fn cluster_manager_and_monitor_split_as_in_the_server() {
        let cluster = Resource::Cluster;
        for a in [ReplSetConfigure, ReplSetGetStatus, ReplSetGetConfig] {
            assert!(role_grants("clusterManager", "admin", a, &cluster), "{a:?}");
        }
        assert!(!role_grants(
            "clusterManager",
            "admin",
            Find,
            &coll("local", "oplog.rs")
        ));
        assert!(role_grants(
            "clusterManager",
            "admin",
            Find,
            &coll("local", "system.replset")
        ));
        assert!(role_grants(
            "clusterMonitor",
            "admin",
            Find,
            &coll("local", "oplog.rs")
        ));
        assert!(!role_grants(
            "clusterMonitor",
            "admin",
            ReplSetConfigure,
            &cluster
        ));
        assert!(!role_grants(
            "clusterMonitor",
            "admin",
            Find,
            &coll("app", "docs")
        ));
        assert!(!role_grants(
            "clusterManager",
            "admin",
            Find,
            &coll("app", "docs")
        ));
        assert!(role_grants(
            "clusterAdmin",
            "admin",
            Find,
            &coll("local", "oplog.rs")
        ));
    }

    #[test]
    fn system_collections_need_a_grant_of_their_own() {
        assert!(role_grants("read", "app", Find, &coll("app", "docs")));
        assert!(role_grants("read", "app", Find, &coll("app", "system.js")));
        assert!(!role_grants(
            "read",
            "admin",
            Find,
            &coll("admin", "system.users")
        ));
        assert!(!role_grants(
            "readAnyDatabase",
            "admin",
            Find,
            &coll("admin", "system.users")
        ));
        assert!(role_grants(
            "userAdminAnyDatabase",
            "admin",
            Find,
            &coll("admin", "system.users")
        ));
        assert!(role_grants(
            "root",
            "admin",
            Find,
            &coll("admin", "system.users")
        ));
    }

    #[test]
    fn root_is_everything_but_internal() {
        assert!(role_grants("root", "admin", Find, &db("local")));
        assert!(role_grants(
            "root",
            "admin",
            ReplSetConfigure,
            &Resource::Cluster
        ));
        assert!(!role_grants("root", "admin", Internal, &Resource::Cluster));
        assert!(role_grants(
            "__system",
            "admin",
            Internal,
            &Resource::Cluster
        ));
    }

    #[test]
    fn heartbeats_need_the_internal_action() {
        let r = requirement("replSetHeartbeat", &bson::doc! {}, "admin");
        assert_eq!(
            r,
            Requirement::Privileges(vec![Privilege::on_cluster(Internal)])
        );
        assert_eq!(
            requirement("hello", &bson::doc! {}, "admin"),
            Requirement::None
        );
    }
}
