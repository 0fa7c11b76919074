//! The test kit shared by vhost-pump's integration tests (`tests/`) and its lab harness
//! (`perf/`). Not published.
//!
//! - [`guest`]: the test guest (Debian cloud kernel + busybox initramfs, built and cached by
//!   `tests/setup/build-guest.sh`) under QEMU, with a console to run commands on, and the QEMU
//!   builds the tests need.
//! - [`netns`]: network namespaces, interfaces and their counters, raw AF_PACKET peers, and
//!   the daemon as a child process.
//! - [`vhost_driver`]: a raw vhost-user frontend with guest memory in a memfd and split rings,
//!   for driving a backend without a VM.

pub mod guest;
pub mod netns;
pub mod vhost_driver;

use std::path::{Path, PathBuf};

/// The repository's root directory (where `tests/setup/` lives).
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Cargo's scratch directory for integration tests, `<target dir>/tmp` (the running test is
/// `<target dir>/<profile>/deps/…`, whatever the target directory is called).
pub fn target_tmpdir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    // Now `<target dir>/<profile>`.
    if dir.pop() {
        dir.join("tmp")
    } else {
        std::env::temp_dir()
    }
}

/// The `vhost-pump` daemon binary: `$VHOST_PUMP_BIN`, else the one cargo built next to the
/// running test (`target/<profile>/vhost-pump`, the test itself being in `deps/`).
pub fn daemon_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(b) = std::env::var("VHOST_PUMP_BIN") {
            return b;
        }
        let exe = std::env::current_exe().unwrap_or_default();
        let mut dir: PathBuf = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.ends_with("deps") {
            dir.pop();
        }
        dir.join("vhost-pump").to_string_lossy().into_owned()
    })
}
