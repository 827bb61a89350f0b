//! Logging set-up for the binaries: `tracing` to stderr, filtered by
//! `MIGFS_LOG` (or `RUST_LOG`), `info` by default.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `default` is the filter used when neither
/// `MIGFS_LOG` nor `RUST_LOG` is set.
pub fn init(default: &str) {
    let filter = std::env::var("MIGFS_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
