//! The redb database behind a handle the writer can reopen.
//!
//! redb latches a failed write or fsync: from then on every transaction of
//! that `Database` fails with "Previous I/O error occurred. Please close and
//! re-open the database." A disk that filled up would otherwise stop the
//! broker until a restart. The writer closes the failed database and opens
//! the file again ([`Db::reopen`]); redb's repair on open brings the file
//! back to its last durable commit.
//!
//! Owns: the one open `Database` of the data directory, and how to open it
//! (path, cache size, the test fault backend).
//!
//! Invariants: nothing outside this module holds the `Database` itself, only
//! transactions begun from it, so the writer can always close it. While it
//! is closed or failed, reads and writes fail with a storage error that says
//! so; no other state changes.

use super::faults;
use super::StorageError;
use redb::{Database, ReadTransaction, ReadableDatabase, WriteTransaction};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// Where a [`Db`] reads from: the live handle, or a bare `Database` while
/// the store is being opened.
pub trait ReadSource {
    /// A read transaction: a consistent snapshot.
    fn read_txn(&self) -> Result<ReadTransaction, StorageError>;
}

impl ReadSource for Database {
    fn read_txn(&self) -> Result<ReadTransaction, StorageError> {
        Ok(self.begin_read()?)
    }
}

impl<T: ReadSource + ?Sized> ReadSource for std::sync::Arc<T> {
    fn read_txn(&self) -> Result<ReadTransaction, StorageError> {
        (**self).read_txn()
    }
}

/// How to open the data directory's database.
#[derive(Clone)]
struct OpenSpec {
    path: PathBuf,
    data_dir: PathBuf,
    cache_bytes: usize,
    /// The fault-injecting backend (tests only).
    faults: bool,
}

/// The database, reopened in place after an I/O error.
pub struct Db {
    current: RwLock<Option<Database>>,
    spec: OpenSpec,
}

impl Db {
    /// Open (or create) `dir`'s database file.
    pub fn open(dir: &Path, file_name: &str, cache_bytes: usize) -> Result<Db, StorageError> {
        let faults = std::env::var_os(faults::FAULTS_ENV).is_some_and(|v| v == "1");
        if faults {
            tracing::warn!(
                "storage fault injection is on ({}=1): for tests only",
                faults::FAULTS_ENV
            );
        }
        let spec = OpenSpec {
            path: dir.join(file_name),
            data_dir: dir.to_path_buf(),
            cache_bytes,
            faults,
        };
        let db = open_database(&spec)?;
        Ok(Db {
            current: RwLock::new(Some(db)),
            spec,
        })
    }

    /// Whether the fault-injecting backend is on (`MSMQ_STORAGE_FAULTS=1`).
    pub fn faults_on(&self) -> bool {
        self.spec.faults
    }

    /// Run `f` on the open database (at start-up, before any writer).
    pub fn with<R>(
        &self,
        f: impl FnOnce(&Database) -> Result<R, StorageError>,
    ) -> Result<R, StorageError> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        f(current.as_ref().ok_or_else(closed)?)
    }

    pub fn begin_write(&self) -> Result<WriteTransaction, StorageError> {
        self.with(|db| Ok(db.begin_write()?))
    }

    /// Whether the database refuses writes for an earlier I/O error (or is
    /// closed): it must be reopened.
    pub fn needs_reopen(&self) -> bool {
        // A write transaction that is begun and dropped changes nothing.
        self.begin_write().is_err()
    }

    /// Close the database and open its file again. On failure the handle
    /// stays closed (reads and writes fail) until a later reopen succeeds.
    pub fn reopen(&self) -> Result<(), StorageError> {
        let failed = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(failed) = failed {
            // The close of a failed database writes nothing and releases
            // the file and its locks; its error is the I/O error we know of.
            if let Err(e) = failed.close() {
                tracing::debug!(error = %e, "closing the failed database");
            }
        }
        // Opened without the lock: readers fail fast meanwhile instead of
        // waiting out redb's repair. Only the writer reopens, so nothing
        // else fills the handle in between.
        let reopened = open_database(&self.spec)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(reopened);
        Ok(())
    }
}

impl Db {
    /// Close the database for good: reads and writes fail from now on, and
    /// the file is free to be opened again.
    pub fn close(&self) {
        let db = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(db) = db {
            drop(db);
        }
    }
}

impl ReadSource for Db {
    fn read_txn(&self) -> Result<ReadTransaction, StorageError> {
        self.with(|db| Ok(db.begin_read()?))
    }
}

fn closed() -> StorageError {
    StorageError::Redb(
        "the database is closed while the broker reopens it after an I/O error; retry shortly"
            .into(),
    )
}

fn open_database(spec: &OpenSpec) -> Result<Database, StorageError> {
    let open_error = |reason: String| StorageError::Open {
        path: spec.path.display().to_string(),
        reason,
    };
    let mut builder = Database::builder();
    builder.set_cache_size(spec.cache_bytes);
    if spec.faults {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&spec.path)
            .map_err(|e| open_error(e.to_string()))?;
        let backend = faults::FaultyBackend::new(file, &spec.data_dir)
            .map_err(|e| open_error(e.to_string()))?;
        builder.create_with_backend(backend)
    } else {
        builder.create(&spec.path)
    }
    .map_err(|e| open_error(e.to_string()))
}
