//! Compiles the proto with protox so that no system `protoc` is needed, and
//! records the git revision the binary is built from (`--version`, the
//! startup log line and `metadata_build_info`).
use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;

/// Names the revision for `METADATA_GIT_REVISION`: set by a build with no
/// `.git` (the Docker build context leaves it out) from a build argument.
const REVISION_OVERRIDE: &str = "METADATA_GIT_REVISION";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/metadata/v1/metadata.proto",
        "proto/metadata/v1/schema.proto",
        "proto/metadata/v1/transaction.proto",
        "proto/metadata/v1/webhook.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection serves this descriptor set, so it must include the imports
    // (protox includes them) for grpcurl to resolve Struct and Timestamp.
    std::fs::write(out_dir.join("metadata_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    let revision = git_revision()?;
    println!("cargo:rustc-env={REVISION_OVERRIDE}={revision}");
    Ok(())
}

/// The override when set, else `git rev-parse --short=12 HEAD`, else
/// `unknown` (no git, or not a checkout: a source archive, the Docker
/// build). No `-dirty` suffix: cargo reruns this script only when the paths
/// it names change, not on every edit of src/, so the mark would go stale.
fn git_revision() -> Result<String, Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed={REVISION_OVERRIDE}");
    if let Some(value) = std::env::var_os(REVISION_OVERRIDE) {
        let value = value.to_string_lossy().trim().to_owned();
        if !value.is_empty() {
            // It ends up inside `--version` and a Prometheus label: keep it
            // one plain word.
            if !value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            {
                return Err(format!(
                    "{REVISION_OVERRIDE}={value:?}: expected letters, digits, '.', '-' or '_'"
                )
                .into());
            }
            return Ok(value);
        }
    }
    // Only this repository's own checkout: a copy of the sources unpacked
    // inside another repository must not take that one's revision.
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let own_checkout = git(&["rev-parse", "--show-toplevel"])
        .and_then(|top| std::fs::canonicalize(top).ok())
        .is_some_and(|top| std::fs::canonicalize(&manifest_dir).is_ok_and(|dir| dir == top));
    let revision = own_checkout
        .then(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .flatten();
    let Some(revision) = revision else {
        return Ok("unknown".to_owned());
    };
    for path in revision_inputs() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    Ok(revision)
}

/// The files whose change means HEAD names another commit: HEAD itself (a
/// checkout, a detached HEAD), the branch it points to (a commit) and
/// packed-refs (where that branch lives once packed). Asked of git, because
/// in a worktree `.git` is a file and the refs live in the main repository.
/// Only existing paths: cargo reruns on every build for a missing one.
fn revision_inputs() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut add = |git_path: &str| {
        if let Some(path) = git(&["rev-parse", "--git-path", git_path]) {
            paths.push(PathBuf::from(path));
        }
    };
    add("HEAD");
    add("packed-refs");
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        add(&branch);
        // A packed branch has no file of its own until its next commit
        // writes one; the directory it will appear in stands in for it.
        if let Some(loose) = paths.last().filter(|p| !p.exists()).cloned() {
            paths.extend(loose.parent().map(Path::to_path_buf));
        }
    }
    // git-path answers relative to the current directory (the manifest's).
    paths.retain(|p| p.exists());
    paths
}

/// A git command's trimmed output, or None when git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_owned())
}
