//! The server's command errors: a numeric code, its name, and a message, exactly the triple
//! that MongoDB puts in a failed reply (`ok: 0, errmsg, code, codeName`).

use bson::{doc, Document};

/// A command failure as the server reports it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code_name} ({code}): {message}")]
pub struct ServerError {
    pub code: i32,
    pub code_name: &'static str,
    pub message: String,
}

macro_rules! codes {
    ($($fn_name:ident => $code:expr, $name:expr;)*) => {
        impl ServerError {
            $(
                #[doc = concat!("`", $name, "` (", stringify!($code), ").")]
                pub fn $fn_name(message: impl Into<String>) -> Self {
                    Self { code: $code, code_name: $name, message: message.into() }
                }
            )*
        }
    };
}

// Codes and names from src/mongo/base/error_codes.yml of the server.
codes! {
    bad_value => 2, "BadValue";
    no_such_key => 4, "NoSuchKey";
    host_unreachable => 6, "HostUnreachable";
    type_mismatch => 14, "TypeMismatch";
    invalid_options => 72, "InvalidOptions";
    already_initialized => 23, "AlreadyInitialized";
    max_time_ms_expired => 50, "MaxTimeMSExpired";
    command_not_found => 59, "CommandNotFound";
    write_concern_failed => 64, "WriteConcernFailed";
    node_not_found => 74, "NodeNotFound";
    no_replication_enabled => 76, "NoReplicationEnabled";
    invalid_replica_set_config => 93, "InvalidReplicaSetConfig";
    not_yet_initialized => 94, "NotYetInitialized";
    not_secondary => 95, "NotSecondary";
    operation_failed => 96, "OperationFailed";
    new_replica_set_configuration_incompatible => 103, "NewReplicaSetConfigurationIncompatible";
    node_not_electable => 104, "NodeNotElectable";
    exceeded_time_limit => 262, "ExceededTimeLimit";
    conflicting_operation_in_progress => 117, "ConflictingOperationInProgress";
    inconsistent_replica_set_names => 185, "InconsistentReplicaSetNames";
    primary_stepped_down => 189, "PrimarySteppedDown";
    current_config_not_committed_yet => 308, "CurrentConfigNotCommittedYet";
    not_writable_primary => 10107, "NotWritablePrimary";
    interrupted_due_to_repl_state_change => 11602, "InterruptedDueToReplStateChange";
    not_primary_no_secondary_ok => 13435, "NotPrimaryNoSecondaryOk";
    duplicate_key => 11000, "DuplicateKey";
    failed_to_parse => 9, "FailedToParse";
    user_not_found => 11, "UserNotFound";
    protocol_error => 17, "ProtocolError";
    unauthorized => 13, "Unauthorized";
    authentication_failed => 18, "AuthenticationFailed";
    illegal_operation => 20, "IllegalOperation";
    namespace_not_found => 26, "NamespaceNotFound";
    index_not_found => 27, "IndexNotFound";
    role_not_found => 31, "RoleNotFound";
    conflicting_update_operators => 40, "ConflictingUpdateOperators";
    cursor_not_found => 43, "CursorNotFound";
    namespace_exists => 48, "NamespaceExists";
    immutable_field => 66, "ImmutableField";
    cannot_create_index => 67, "CannotCreateIndex";
    invalid_namespace => 73, "InvalidNamespace";
    index_options_conflict => 85, "IndexOptionsConflict";
    index_key_specs_conflict => 86, "IndexKeySpecsConflict";
    operation_not_supported_in_transaction => 263, "OperationNotSupportedInTransaction";
    mechanism_unavailable => 334, "MechanismUnavailable";
}

impl ServerError {
    /// The reply document of a failed command.
    pub fn to_reply(&self) -> Document {
        doc! {
            "ok": 0.0,
            "errmsg": self.message.clone(),
            "code": self.code,
            "codeName": self.code_name,
        }
    }

    /// The same message under the code of `template`, as the command layer does when it
    /// wraps a validation failure (`replSetInitiate` reports every one as
    /// InvalidReplicaSetConfig 93, `replSetReconfig` as NewReplicaSetConfigurationIncompatible).
    pub fn rewrap(self, template: ServerError) -> ServerError {
        ServerError {
            message: self.message,
            ..template
        }
    }
}
