//! Log lines of every process of a node go to stderr (the journal under systemd), each prefixed
//! with the process's role so the interleaved lines of one node can be told apart:
//! `[router] 2026-11-22T10:00:00Z  INFO myelin_router: listening`.
//!
//! `RUST_LOG` filters (default `info`, with openraft at `warn`). No colours when stderr is not a terminal or when it is
//! the journal (`JOURNAL_STREAM` is set), and then no timestamps either: the journal adds its own.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, format};
use tracing_subscriber::registry::LookupSpan;

/// Installs the process-wide subscriber. Call once, first thing in `main`.
pub fn init(role: &str) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = std::io::stderr().is_terminal() && !journal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_env_filter(filter);
    let prefix = format!("[{role}] ");
    // `try_init`: a second call (in tests) keeps the first subscriber.
    let _ = if journal {
        builder
            .event_format(Prefixed {
                prefix,
                inner: format().without_time(),
            })
            .try_init()
    } else {
        builder
            .event_format(Prefixed {
                prefix,
                inner: format(),
            })
            .try_init()
    };
}

/// Writes a fixed prefix, then the event as `inner` formats it.
struct Prefixed<F> {
    prefix: String,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        writer.write_str(&self.prefix)?;
        self.inner.format_event(ctx, writer, event)
    }
}
