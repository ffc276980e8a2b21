//! Tests of the `_admin` group: openraft's storage suite, crash and restart, a three-node group.

use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use super::log_store::AdminLog;
use super::state_machine::AdminStateMachine;
use super::*;

struct Builder;

impl StoreBuilder<AdminTypes, AdminLog, AdminStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, AdminLog, AdminStateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = ControlDb::open(&dir.path().join("control.sqlite3")).expect("open control DB");
        Ok((dir, AdminLog::new(db.clone()), AdminStateMachine::new(db)))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}
