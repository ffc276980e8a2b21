//! `fsync`: how fast this disk makes small appends durable — write a block, `fdatasync`, repeat
//! (what a log writer without group commit would do). Bounds any durable append rate that waits
//! for one sync per append; group commit divides the cost among the appends of one sync.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{self, Common};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Directory to write the test file in (on the disk under test); the file is removed after.
    #[arg(long)]
    pub dir: PathBuf,
    /// Seconds to run.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Bytes written before each fdatasync.
    #[arg(long, default_value_t = 4096)]
    pub block_bytes: usize,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let a = args.clone();
    let (histogram, n) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let path = a.dir.join(format!("myelin-bench-fsync-{}.tmp", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let block = vec![0x5au8; a.block_bytes];
        let mut histogram = common::histogram();
        let end = Instant::now() + Duration::from_secs_f64(a.duration);
        let mut n = 0u64;
        let result = (|| -> anyhow::Result<()> {
            while Instant::now() < end {
                let began = Instant::now();
                file.write_all(&block)?;
                file.sync_data()?;
                common::record(&mut histogram, began.elapsed());
                n += 1;
            }
            Ok(())
        })();
        let _ = std::fs::remove_file(&path);
        result?;
        Ok((histogram, n))
    })
    .await??;
    let rate = n as f64 / args.duration;
    let mut fields = common::latency_fields(&histogram);
    fields.insert("dir".into(), json!(args.dir));
    fields.insert("block_bytes".into(), json!(args.block_bytes));
    fields.insert("syncs".into(), json!(n));
    fields.insert("syncs_per_s".into(), json!(rate.round()));
    let summary = format!(
        "fsync: write {} B + fdatasync in {}: {rate:.0} syncs/s\n  latency {}",
        args.block_bytes,
        args.dir.display(),
        common::latency_line(&histogram)
    );
    common::emit(&args.common, "fsync", fields, &summary);
    Ok(())
}
