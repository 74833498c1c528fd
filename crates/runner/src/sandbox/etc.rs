//! The `/etc` a run sees: a read-only copy, made once at start, of the allowlisted entries that are
//! readable by everyone (so nothing private is copied even when the runner is root), bound as one
//! mount instead of one mount per entry (each mount costs run start-up time). Entries that change
//! while a host runs (`resolv.conf`, `hosts`, `hostname`) are bound live instead. Changes to the
//! other entries reach runs after a runner restart.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Entries bound from the host's `/etc` at every run, because they change at run time.
pub const LIVE: &[&str] = &["resolv.conf", "hosts", "hostname"];

/// Copies `allowlist` (names under `/etc`) into a fresh directory readable by every uid.
pub fn copy(allowlist: &[&str]) -> io::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("custodian-runner-etc-")
        .tempdir()?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
    for name in allowlist.iter().filter(|n| !LIVE.contains(n)) {
        let from = Path::new("/etc").join(name);
        let to = dir.path().join(name);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
            fs::set_permissions(parent, fs::Permissions::from_mode(0o755))?;
        }
        copy_entry(&from, &to)?;
    }
    // Mount points for the live entries: the copy is read-only inside a run.
    for name in LIVE {
        if Path::new("/etc").join(name).exists() {
            fs::File::create(dir.path().join(name))?;
        }
    }
    Ok(dir)
}

/// Copies a file, symlink (as a symlink) or directory tree; skips what others cannot read.
fn copy_entry(from: &Path, to: &Path) -> io::Result<()> {
    let Ok(meta) = fs::symlink_metadata(from) else {
        return Ok(());
    };
    let mode = meta.permissions().mode();
    if meta.file_type().is_symlink() {
        return std::os::unix::fs::symlink(fs::read_link(from)?, to);
    }
    if mode & 0o004 == 0 {
        return Ok(());
    }
    if meta.is_dir() {
        if mode & 0o001 == 0 {
            return Ok(());
        }
        fs::create_dir(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            copy_entry(&entry.path(), &to.join(entry.file_name()))?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(0o755))
    } else if meta.is_file() {
        fs::copy(from, to)?;
        fs::set_permissions(to, fs::Permissions::from_mode(0o644))
    } else {
        Ok(())
    }
}
