//! Credential files of one run (TLS keys, kubeconfigs, service-account JSON, SSH keys).
//!
//! Guarantees:
//! - Isolated runs: each file reaches bubblewrap through an anonymous memory file (`memfd`), which
//!   bubblewrap copies into the run's own in-memory root and binds read-only, mode 0400, at
//!   [`CREDENTIALS_DIR`]`/<filename>`. Nothing is written to the runner's disk, and the copy is gone
//!   with the run's mount namespace when the run ends.
//! - Unisolated runs (`--dangerously-run-without-isolation`, development only): the files are
//!   written, mode 0400, into a fresh 0700 directory in the runner's temp dir, removed when the run
//!   ends. They do touch that directory's file system.
//! - Variable and file names are checked again here ([`SecretFile::check`]); a bad one, or content
//!   that is not base64, refuses the run before anything starts.
#![expect(
    unsafe_code,
    reason = "memfd_create is a plain libc call; its block states why it is sound"
)]

use std::ffi::OsString;
use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use base64::Engine;
use custodian_protocol::{CREDENTIALS_DIR, SecretFile};
use zeroize::Zeroizing;

/// One decoded credential file.
pub struct CredentialFile {
    pub variable: String,
    pub filename: String,
    pub content: Zeroizing<Vec<u8>>,
}

/// Checks and decodes the request's files; the base64 text is wiped as it is consumed.
pub fn decode(files: Vec<SecretFile>) -> Result<Vec<CredentialFile>, String> {
    let mut decoded: Vec<CredentialFile> = Vec::with_capacity(files.len());
    for file in files {
        let SecretFile {
            variable,
            filename,
            content,
        } = file;
        let content = Zeroizing::new(content);
        custodian_protocol::check_variable(&variable)?;
        custodian_protocol::check_filename(&filename)?;
        if decoded.iter().any(|f| f.filename == filename) {
            return Err(format!("two credential files are named `{filename}`"));
        }
        if decoded.iter().any(|f| f.variable == variable) {
            return Err(format!(
                "two credential files use the variable `{variable}`"
            ));
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(content.len()));
        base64::engine::general_purpose::STANDARD
            .decode_vec(content.as_bytes(), &mut bytes)
            .map_err(|_| format!("the content of credential file `{filename}` is not base64"))?;
        decoded.push(CredentialFile {
            variable,
            filename,
            content: bytes,
        });
    }
    Ok(decoded)
}

/// What a started run holds of its files until it is over.
#[derive(Default)]
pub struct Placed {
    /// Each file's variable and its path as the run sees it.
    pub env: Vec<(String, String)>,
    /// Isolated: the memory files bubblewrap copies from.
    pub memfds: Vec<OwnedFd>,
    /// Unisolated: the directory holding the files.
    pub dir: Option<tempfile::TempDir>,
}

/// The files of an isolated run: bubblewrap's arguments, and the memory files they name.
pub fn for_bwrap(files: &[CredentialFile]) -> Result<(Vec<OsString>, Placed), String> {
    let mut args = Vec::new();
    let mut placed = Placed::default();
    for file in files {
        let fd = memfd(&file.content)
            .map_err(|e| format!("cannot hold credential file `{}`: {e}", file.filename))?;
        let inside = format!("{CREDENTIALS_DIR}/{}", file.filename);
        args.extend(
            [
                "--perms".to_owned(),
                "0400".to_owned(),
                "--ro-bind-data".to_owned(),
                fd.as_raw_fd().to_string(),
                inside.clone(),
            ]
            .map(OsString::from),
        );
        placed.env.push((file.variable.clone(), inside));
        placed.memfds.push(fd);
    }
    Ok((args, placed))
}

/// The files of an unisolated run, written into a fresh 0700 directory.
pub fn in_temp_dir(files: &[CredentialFile]) -> Result<Placed, String> {
    use std::os::unix::fs::OpenOptionsExt;
    if files.is_empty() {
        return Ok(Placed::default());
    }
    let dir = tempfile::Builder::new()
        .prefix("custodian-credentials-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .map_err(|e| format!("cannot create a credentials directory: {e}"))?;
    let mut env = Vec::new();
    for file in files {
        let path: PathBuf = dir.path().join(&file.filename);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&path)
            .and_then(|mut f| f.write_all(&file.content))
            .map_err(|e| format!("cannot write credential file `{}`: {e}", file.filename))?;
        env.push((file.variable.clone(), path.display().to_string()));
    }
    Ok(Placed {
        env,
        memfds: Vec::new(),
        dir: Some(dir),
    })
}

/// An anonymous memory file holding `content`, read from its start (close-on-exec until the
/// sandbox clears that flag for bubblewrap).
fn memfd(content: &[u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_create takes a static C string and flags; it returns a new descriptor we own.
    let raw = unsafe { libc::memfd_create(c"custodian-credential".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut file = std::fs::File::from(fd);
    file.write_all(content)?;
    file.rewind()?;
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(variable: &str, filename: &str, content: &[u8]) -> SecretFile {
        SecretFile {
            variable: variable.to_owned(),
            filename: filename.to_owned(),
            content: base64::engine::general_purpose::STANDARD.encode(content),
        }
    }

    #[test]
    fn bad_names_duplicates_and_content_refuse_the_run() {
        for bad in [
            vec![file("KUBECONFIG", "../etc/passwd", b"x")],
            vec![file("KUBECONFIG", "a/b", b"x")],
            vec![file("PATH", "kubeconfig", b"x")],
            vec![file("lower", "kubeconfig", b"x")],
            vec![file("A", "same", b"x"), file("B", "same", b"y")],
            vec![file("A", "one", b"x"), file("A", "two", b"y")],
            vec![SecretFile {
                content: "not base64!".into(),
                ..file("A", "one", b"")
            }],
        ] {
            assert!(decode(bad).is_err());
        }
        let decoded = decode(vec![file("TLS_KEY", "client.key", b"\x00binary\xff")]).unwrap();
        assert_eq!(decoded[0].content.as_slice(), b"\x00binary\xff");
    }

    #[test]
    fn unisolated_files_are_0400_in_a_0700_dir_removed_after_the_run() {
        let files = decode(vec![file("TLS_KEY", "client.key", b"key-material-123")]).unwrap();
        let placed = in_temp_dir(&files).unwrap();
        let dir = placed.dir.as_ref().unwrap().path().to_path_buf();
        let (variable, path) = &placed.env[0];
        assert_eq!(variable, "TLS_KEY");
        assert_eq!(std::fs::read(path).unwrap(), b"key-material-123");
        let mode = |p: &str| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(path), 0o400);
        assert_eq!(mode(dir.to_str().unwrap()), 0o700);
        drop(placed);
        assert!(!dir.exists());
    }

    #[test]
    fn isolated_files_are_memory_files_named_in_bwrap_arguments() {
        let files = decode(vec![file("TLS_KEY", "client.key", b"key-material-123")]).unwrap();
        let (args, placed) = for_bwrap(&files).unwrap();
        let fd = placed.memfds[0].as_raw_fd().to_string();
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "--perms",
                "0400",
                "--ro-bind-data",
                &fd,
                "/run/credentials/client.key"
            ]
        );
        assert_eq!(
            placed.env,
            [(
                "TLS_KEY".to_owned(),
                "/run/credentials/client.key".to_owned()
            )]
        );
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert!(link.to_string_lossy().starts_with("/memfd:"), "{link:?}");
        assert!(placed.dir.is_none());
    }
}
