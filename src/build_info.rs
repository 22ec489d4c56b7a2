//! What this binary is: the crate version and the git revision build.rs
//! recorded, shown by `--version`, the startup log line and the
//! `metadata_build_info` metric, so that a running replica can be traced
//! back to its source.

/// The crate version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `git rev-parse --short=12 HEAD` when built from a checkout, the
/// `METADATA_GIT_REVISION` build override (the Docker build has no `.git`),
/// else `unknown`.
pub const REVISION: &str = env!("METADATA_GIT_REVISION");

/// `--version`'s text after the program name: `0.1.0 (8a41274cb86e)`.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("METADATA_GIT_REVISION"),
    ")"
);
