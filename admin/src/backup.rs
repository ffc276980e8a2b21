//! Backups over HTTP: a consistent copy of the control DB, and the lists of event store files a
//! backup copies (Axon Server's `/v1/backup/*` paths). `myelin-backup-agent` drives them; see
//! docs/backups.md for the procedure.
//!
//! What holds:
//! - **The control DB copy is consistent.** It is made with SQLite's online backup API from a
//!   read-only connection of its own (writers go on; a page changed meanwhile restarts the copy),
//!   into a temp file that is then zipped to `controldb<epochMillis>.zip.tmp`, fsynced and
//!   renamed: a zip with the final name is always whole.
//! - **The log the copy refers to stays on disk.** Before copying, admin asks the event store to
//!   hold log compaction for the configured window (`--backup-log-hold-minutes`, 30 by default):
//!   no Raft log segment is deleted until it ends, so a backup that copies the log within the
//!   window gets every segment it lists. The hold lives in the event store's memory; a restarted
//!   event store has none.
//! - **Lists name only files that are safe to copy.** Closed segments never change and are
//!   listed only once their index and bloom filter are durable; the open segment and the last
//!   log segment only grow, so a copy of them is a prefix that recovery trims to whole records.
//! - Bad input (missing or unknown `type`, a non-numeric position, an invalid context name) is a
//!   400 with a JSON body; an unknown context is a 404 with AXONIQ-1302.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use myelin_proto::internal::{HoldLogCompactionRequest, ListLogSegmentsRequest, ListSegmentsRequest, SegmentKind};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::error::ErrorBody;
use crate::api::{ApiError, AppState, Params, check_context_name, clip};

/// Default of `--backup-log-hold-minutes`.
pub const DEFAULT_LOG_HOLD_MINUTES: u64 = 30;
/// The longest hold the event store accepts is a day; keep the setting below it.
pub const MAX_LOG_HOLD_MINUTES: u64 = 24 * 60 - 1;

/// Where control-DB backups go and how long the log is kept for a backup.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Axon's `axoniq.axonserver.controldb-backup-location`.
    pub location: PathBuf,
    /// How long after a control-DB backup no Raft log segment is deleted.
    pub log_hold: Duration,
}

impl Settings {
    /// The backup location given, else `backups` under the data directory, else next to the
    /// control DB.
    pub fn new(location: Option<&Path>, data_dir: Option<&Path>, control_db: &Path, hold_minutes: u64) -> Settings {
        let location = match (location, data_dir) {
            (Some(location), _) => location.to_owned(),
            (None, Some(data)) => data.join("backups"),
            (None, None) => control_db
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .join("backups"),
        };
        Settings {
            location: std::path::absolute(&location).unwrap_or(location),
            log_hold: Duration::from_secs(hold_minutes.min(MAX_LOG_HOLD_MINUTES) * 60),
        }
    }
}

/// Serializes control-DB backups, so two of them never pick the same file name.
static BACKUP_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The backup route set, merged into the API by `crate::route_sets`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_control_db_backup))
        .routes(routes!(create_control_db_backup_se))
        .routes(routes!(filenames))
        .routes(routes!(eventstore))
        .routes(routes!(log_filenames))
}

/// Copies the control DB (SQLite online backup) into `controldb<epochMillis>.zip` in the backup
/// location and answers its full path as text. First holds Raft log compaction for the
/// configured window, so the log a backup copies next still matches this copy.
#[utoipa::path(post, path = "/v1/backup/createControlDbBackup", tag = "backup",
    responses(
        (status = 200, description = "Full path of the zip written", body = String, content_type = "text/plain"),
        (status = 503, description = "The event store did not answer (log compaction not held)", body = ErrorBody),
    ))]
pub async fn create_control_db_backup(State(state): State<AppState>) -> Result<Response, ApiError> {
    let path = control_db_backup(&state).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        path.display().to_string(),
    )
        .into_response())
}

/// Axon Server SE's path of `/v1/backup/createControlDbBackup`.
#[utoipa::path(post, path = "/createControlDbBackup", tag = "backup",
    responses(
        (status = 200, description = "Full path of the zip written", body = String, content_type = "text/plain"),
        (status = 503, description = "The event store did not answer (log compaction not held)", body = ErrorBody),
    ))]
pub async fn create_control_db_backup_se(state: State<AppState>) -> Result<Response, ApiError> {
    create_control_db_backup(state).await
}

#[tracing::instrument(skip_all)]
async fn control_db_backup(state: &AppState) -> Result<PathBuf, ApiError> {
    let settings = state.backup.clone();
    let _one_at_a_time = BACKUP_LOCK.lock().await;
    // Hold first: the hold then covers the whole time from the copy on.
    let until = SystemTime::now() + settings.log_hold;
    let until_unix_millis = until
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    state
        .storage
        .clone()
        .hold_log_compaction(HoldLogCompactionRequest { until_unix_millis })
        .await
        .map_err(|status| ApiError::from_status("the event store", status))?;
    let source = state.db.path().to_owned();
    let location = settings.location.clone();
    let path = tokio::task::spawn_blocking(move || write_backup(&source, &location))
        .await
        .map_err(|e| ApiError::internal(format!("control DB backup task: {e}")))?
        .map_err(|e| ApiError::internal(format!("control DB backup into {}: {e:#}", settings.location.display())))?;
    let recorded = path.display().to_string();
    state
        .db
        .call(move |conn| crate::control_db::backups::record_control_db_backup(conn, &recorded))
        .await?;
    tracing::info!(path = %path.display(), hold_until_unix_millis = until_unix_millis, "control DB backed up");
    Ok(path)
}

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Copies the DB at `source` into `location/controldb<millis>.zip` (temp name, fsync, rename,
/// directory fsync) and returns the zip's path.
pub fn write_backup(source: &Path, location: &Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    std::fs::create_dir_all(location).with_context(|| format!("creating {}", location.display()))?;
    let mut millis = now_millis();
    let zip_path = loop {
        let candidate = location.join(format!("controldb{millis}.zip"));
        if !candidate.exists() {
            break candidate;
        }
        millis += 1;
    };
    let copy = location.join(format!(".controldb{millis}.sqlite3.tmp"));
    let result = (|| {
        snapshot_db(source, &copy)?;
        let entry = source
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("controldb.sqlite3")
            .to_owned();
        zip_file(&copy, &entry, &zip_path)
    })();
    let _ = std::fs::remove_file(&copy);
    if result.is_err() {
        let _ = std::fs::remove_file(zip_path.with_extension("zip.tmp"));
    }
    result?;
    Ok(zip_path)
}

/// SQLite's online backup of `source` into a new file `dest`, left in rollback-journal mode so
/// the copy is one self-contained file.
fn snapshot_db(source: &Path, dest: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use rusqlite::{Connection, OpenFlags};
    let _ = std::fs::remove_file(dest);
    let from = Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {} read-only", source.display()))?;
    from.busy_timeout(Duration::from_secs(5))?;
    let mut to = Connection::open(dest).with_context(|| format!("creating {}", dest.display()))?;
    {
        let backup = rusqlite::backup::Backup::new(&from, &mut to)?;
        backup
            .run_to_completion(256, Duration::from_millis(5), None)
            .context("SQLite online backup")?;
    }
    let _mode: String = to.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))?;
    let check: String = to.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    anyhow::ensure!(check == "ok", "the copy fails SQLite's check: {check}");
    to.close().map_err(|(_, e)| e)?;
    Ok(())
}

/// Zips `file` as `entry` into `dest` durably: written to `dest.tmp`, fsynced, renamed, and the
/// directory fsynced.
fn zip_file(file: &Path, entry: &str, dest: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let tmp = dest.with_extension("zip.tmp");
    let out = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut zip = zip::ZipWriter::new(out);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    zip.start_file(entry, options)?;
    let mut input = std::fs::File::open(file)?;
    std::io::copy(&mut input, &mut zip)?;
    let mut out = zip.finish()?;
    out.flush()?;
    out.sync_all().with_context(|| format!("fsync {}", tmp.display()))?;
    drop(out);
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming to {}", dest.display()))?;
    if let Some(dir) = dest.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Event or snapshot segments.
fn segment_kind(value: Option<&str>) -> Result<SegmentKind, ApiError> {
    match value.map(str::to_ascii_uppercase).as_deref() {
        Some("EVENT") => Ok(SegmentKind::Event),
        Some("SNAPSHOT") => Ok(SegmentKind::Snapshot),
        Some(_) => Err(ApiError::bad_request(format!(
            "type must be EVENT or SNAPSHOT, not {:?}",
            clip(value.unwrap_or_default())
        ))),
        None => Err(ApiError::bad_request("type is required: EVENT or SNAPSHOT")),
    }
}

/// Parameters of `/v1/backup/filenames`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct FilenamesQuery {
    /// The context (required).
    pub context: Option<String>,
    /// `EVENT` or `SNAPSHOT` (required).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub kind: Option<String>,
    /// Base token of the newest closed segment already backed up; -1 (default) for none.
    pub last_segment_backed_up: Option<i64>,
}

/// Parameters of `/v1/backup/eventstore`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct EventStoreQuery {
    /// The context; default `default`.
    pub target_context: Option<String>,
    /// `EVENT` or `SNAPSHOT` (required).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub kind: Option<String>,
    /// Base token of the newest closed segment already backed up; -1 (default) for none.
    pub last_closed_segment_backed_up: Option<i64>,
}

/// Parameters of `/v1/backup/log/filenames`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// The context (required).
    pub context: Option<String>,
}

/// What `/v1/backup/eventstore` answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventStoreFiles {
    /// Base token of the newest closed segment, -1 when there is none: pass it as
    /// `lastClosedSegmentBackedUp` next time.
    pub last_closed_segment: i64,
    /// Absolute paths: closed segments newer than the one given (each with its index and bloom
    /// filter), oldest first, then the open segment.
    pub filenames: Vec<String>,
}

fn required_context(context: Option<String>, name: &str) -> Result<String, ApiError> {
    let context = context.ok_or_else(|| ApiError::bad_request(format!("{name} is required")))?;
    check_context_name(&context)?;
    Ok(context)
}

async fn list_segments(
    state: &AppState,
    context: String,
    kind: SegmentKind,
    last: Option<i64>,
) -> Result<myelin_proto::internal::ListSegmentsResponse, ApiError> {
    let last = last.unwrap_or(-1);
    if last < -1 {
        return Err(ApiError::bad_request(format!(
            "a segment position is -1 or more, not {last}"
        )));
    }
    state
        .storage
        .clone()
        .list_segments(ListSegmentsRequest {
            context,
            kind: kind as i32,
            last_segment_backed_up: last,
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| ApiError::from_status("the event store", status))
}

/// Closed event or snapshot segment files newer than `lastSegmentBackedUp`, oldest first, each
/// followed by its index and bloom filter: files that never change again.
#[utoipa::path(get, path = "/v1/backup/filenames", tag = "backup",
    params(FilenamesQuery),
    responses(
        (status = 200, description = "Absolute paths", body = Vec<String>),
        (status = 400, description = "Missing or invalid parameter", body = ErrorBody),
        (status = 404, description = "No such context (AXONIQ-1302)", body = ErrorBody),
    ))]
pub async fn filenames(
    State(state): State<AppState>,
    Params(query): Params<FilenamesQuery>,
) -> Result<Json<Vec<String>>, ApiError> {
    let kind = segment_kind(query.kind.as_deref())?;
    let context = required_context(query.context, "context")?;
    let listed = list_segments(&state, context, kind, query.last_segment_backed_up).await?;
    Ok(Json(
        listed
            .segments
            .into_iter()
            .filter(|s| s.closed)
            .flat_map(|s| s.paths)
            .collect(),
    ))
}

/// Axon's newer form: closed segments newer than `lastClosedSegmentBackedUp` and the open
/// segment, with the base of the newest closed segment.
#[utoipa::path(get, path = "/v1/backup/eventstore", tag = "backup",
    params(EventStoreQuery),
    responses(
        (status = 200, body = EventStoreFiles),
        (status = 400, description = "Missing or invalid parameter", body = ErrorBody),
        (status = 404, description = "No such context (AXONIQ-1302)", body = ErrorBody),
    ))]
pub async fn eventstore(
    State(state): State<AppState>,
    Params(query): Params<EventStoreQuery>,
) -> Result<Json<EventStoreFiles>, ApiError> {
    let kind = segment_kind(query.kind.as_deref())?;
    let context = query
        .target_context
        .unwrap_or_else(|| myelin_proto::DEFAULT_CONTEXT.to_owned());
    check_context_name(&context)?;
    let listed = list_segments(&state, context, kind, query.last_closed_segment_backed_up).await?;
    Ok(Json(EventStoreFiles {
        last_closed_segment: listed.last_closed_segment,
        filenames: listed.segments.into_iter().flat_map(|s| s.paths).collect(),
    }))
}

/// Every Raft log segment of the context, oldest first (the last one is still appended to), then
/// the Raft state files a restore needs with them (`member.json`, `log/vote`, `log/purged`,
/// `raft-state.json`, `snapshot.json`), in the order they must be copied. A backup replaces its copy of the log
/// with exactly these files.
#[utoipa::path(get, path = "/v1/backup/log/filenames", tag = "backup",
    params(LogQuery),
    responses(
        (status = 200, description = "Absolute paths", body = Vec<String>),
        (status = 400, description = "Missing or invalid parameter", body = ErrorBody),
        (status = 404, description = "No such context (AXONIQ-1302)", body = ErrorBody),
    ))]
pub async fn log_filenames(
    State(state): State<AppState>,
    Params(query): Params<LogQuery>,
) -> Result<Json<Vec<String>>, ApiError> {
    let context = required_context(query.context, "context")?;
    let listed = state
        .storage
        .clone()
        .list_log_segments(ListLogSegmentsRequest { context })
        .await
        .map_err(|status| ApiError::from_status("the event store", status))?
        .into_inner();
    let mut paths: Vec<String> = listed.segments.into_iter().flat_map(|s| s.paths).collect();
    paths.extend(listed.state_files);
    Ok(Json(paths))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_is_a_whole_zip_of_a_consistent_copy() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("control.sqlite3");
        let conn = rusqlite::Connection::open(&db).unwrap();
        let _: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2), (3);")
            .unwrap();
        let location = dir.path().join("backups");
        let first = write_backup(&db, &location).unwrap();
        let second = write_backup(&db, &location).unwrap();
        assert_ne!(first, second, "two backups never share a name");
        let name = first.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("controldb") && name.ends_with(".zip"), "{name}");
        let leftovers: Vec<_> = std::fs::read_dir(&location)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.ends_with(".zip"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let mut archive = zip::ZipArchive::new(std::fs::File::open(&second).unwrap()).unwrap();
        let mut entry = archive.by_name("control.sqlite3").unwrap();
        let restored = dir.path().join("restored.sqlite3");
        std::io::copy(&mut entry, &mut std::fs::File::create(&restored).unwrap()).unwrap();
        let copy = rusqlite::Connection::open(&restored).unwrap();
        let sum: i64 = copy.query_row("SELECT sum(x) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(sum, 6);
    }

    #[test]
    fn the_openapi_document_lists_the_backup_endpoints() {
        let api = crate::api::openapi();
        for path in [
            "/v1/backup/createControlDbBackup",
            "/createControlDbBackup",
            "/v1/backup/filenames",
            "/v1/backup/eventstore",
            "/v1/backup/log/filenames",
        ] {
            assert!(api.paths.paths.contains_key(path), "{path} missing");
        }
    }

    #[test]
    fn segment_kinds() {
        assert_eq!(segment_kind(Some("EVENT")).unwrap(), SegmentKind::Event);
        assert_eq!(segment_kind(Some("snapshot")).unwrap(), SegmentKind::Snapshot);
        for bad in [None, Some(""), Some("LOG"), Some("events")] {
            let e = segment_kind(bad).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn the_location_defaults_under_the_data_directory() {
        let s = Settings::new(None, Some(Path::new("/var/lib/myelin")), Path::new("/x/c.db"), 30);
        assert_eq!(s.location, PathBuf::from("/var/lib/myelin/backups"));
        assert_eq!(s.log_hold, Duration::from_secs(30 * 60));
        let s = Settings::new(
            Some(Path::new("/b")),
            Some(Path::new("/d")),
            Path::new("/x/c.db"),
            100_000,
        );
        assert_eq!(s.location, PathBuf::from("/b"));
        assert!(s.log_hold < Duration::from_secs(24 * 3600));
        let s = Settings::new(None, None, Path::new("/x/c.db"), 1);
        assert_eq!(s.location, PathBuf::from("/x/backups"));
    }
}
