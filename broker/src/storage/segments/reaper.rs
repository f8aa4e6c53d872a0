//! The writer's side of retention on disk: finds the segment files no log
//! row points into any more and deletes them after the commit that dropped
//! their rows, which is a durable checkpoint.

use super::*;

type FilesTable<'t> = redb::Table<'t, u64, u64>;

/// The writer's side: once trims or topic deletes dropped rows, finds the
/// files no row points into any more, drops their `log_files` rows, and
/// deletes them once that commit succeeded.
pub struct SegmentReaper {
    segments: Arc<Segments>,
    doomed: Vec<u64>,
    /// Rows were dropped in this commit: look for files to delete.
    rows_dropped: bool,
}

impl SegmentReaper {
    pub fn new(segments: Arc<Segments>) -> SegmentReaper {
        SegmentReaper {
            segments,
            doomed: Vec::new(),
            rows_dropped: false,
        }
    }

    pub fn segments(&self) -> &Arc<Segments> {
        &self.segments
    }

    /// Log rows were removed (a trim, a topic delete).
    pub fn rows_dropped(&mut self) {
        self.rows_dropped = true;
    }

    /// After a commit's commands: drop the files below both the oldest file
    /// a partition's first row points into and `first_live_number`.
    pub fn collect(
        &mut self,
        log: &impl ReadableTable<(u32, u32, u64), &'static [u8]>,
        partitions: &impl ReadableTable<(u32, u32), (u64, u64)>,
        files: &mut FilesTable,
        first_live_number: u64,
    ) -> Result<(), StorageError> {
        if !std::mem::take(&mut self.rows_dropped) {
            return Ok(());
        }
        let mut oldest = first_live_number;
        for entry in partitions.iter()? {
            let (topic, partition) = entry?.0.value();
            for row in log.range((topic, partition, 0)..=(topic, partition, u64::MAX))? {
                // Rows of older versions may hold their batch: not in a file.
                if let Some(at) = batch::pointer(row?.1.value()).map_err(StorageError::Corrupt)? {
                    oldest = oldest.min(at.segment);
                    break;
                }
            }
        }
        let doomed: Vec<u64> = files
            .range(..oldest)?
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for number in doomed {
            files.remove(number)?;
            self.doomed.push(number);
        }
        Ok(())
    }

    /// Whether the coming commit deletes files (it must then be durable).
    pub fn deletes_files(&self) -> bool {
        !self.doomed.is_empty()
    }

    /// The commit succeeded: delete the files it dropped.
    pub fn committed(&mut self) {
        for number in std::mem::take(&mut self.doomed) {
            let path = self.segments.path(number);
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::debug!(file = %path.display(), "deleted a trimmed segment"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "deleting a trimmed segment failed; start-up retries")
                }
            }
            self.segments.forget(number);
        }
    }

    /// The commit failed: its drops did not happen (the next trim looks
    /// again).
    pub fn failed(&mut self) {
        self.doomed.clear();
        self.rows_dropped = true;
    }
}
