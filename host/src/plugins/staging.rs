//! The staging directory: where the host writes the content-hashed copies of
//! plugin libraries that it maps, and nothing else does.
//!
//! Whoever can write a file the host `dlopen`s runs code as the host's user,
//! so the directory must be writable by that user alone:
//!
//! - It is created with mode 0700. An existing one is used only if it is a
//!   real directory (not a symlink), owned by the host's effective user, and
//!   grants group and others no access at all; anything else is refused with
//!   an error naming the path, what was found and what to do. A directory
//!   someone else created first (the default path is predictable) is refused,
//!   never used.
//! - Its parent must not let others rename it away and put their own in its
//!   place: a parent writable by group or others needs the sticky bit (as
//!   `/tmp` has).
//! - A staged copy is named by its content hash, and a file found under that
//!   name is used only if it is a regular file owned by the host's user,
//!   writable by nobody else, whose bytes hash to that name; otherwise a
//!   fresh copy is renamed over it (never written through it).
//!   [`Staging::verify`] re-hashes a copy right before it is loaded.
//! - Copies are written to a random temporary name opened with
//!   `O_CREAT | O_EXCL` (mode 0600), which fails on any existing entry, a
//!   planted symlink included, and then renamed into place.
//!
//! The directory keeps what is in use: [`Staging::clean`] removes the
//! copies (and temporary files left by a crash) that the host no longer
//! maps, once none has been staged or reused for `plugins.staging_grace_secs`.
//! A mapped library stays mapped after its file is removed, so removing a
//! copy never disturbs a process that loaded it; the grace period protects
//! another host of the same user sharing the directory between staging a
//! copy (or reusing one, which renews its time) and mapping it.

use std::collections::BTreeSet;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// The process's effective user id: the owner of every file it creates.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// SHA-256 of `bytes`, as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A private staging directory.
#[derive(Debug, Clone)]
pub struct Staging {
    dir: PathBuf,
}

/// What is under a staged copy's name.
#[derive(Debug, PartialEq, Eq)]
enum Existing {
    /// Nothing.
    Missing,
    /// The right bytes, in a file only the host's user can write.
    Good,
    /// Something else; why.
    Bad(String),
}

impl Staging {
    /// The staging directory at `dir` (nothing is checked yet: see
    /// [`Staging::prepare`]).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory (mode 0700, parents included) or checks the
    /// existing one. An error names the path, what was found and what to do.
    pub fn prepare(&self) -> Result<(), String> {
        let dir = &self.dir;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|err| {
                format!(
                    "cannot create the staging directory {}: {err}",
                    dir.display()
                )
            })?;
        let meta = std::fs::symlink_metadata(dir).map_err(|err| {
            format!(
                "cannot inspect the staging directory {}: {err}",
                dir.display()
            )
        })?;
        check_private_dir(dir, &meta, euid())?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            let meta = std::fs::metadata(parent).map_err(|err| {
                format!(
                    "cannot inspect {}, the staging directory's parent: {err}",
                    parent.display()
                )
            })?;
            check_parent(dir, parent, &meta)?;
        }
        Ok(())
    }

    /// The path of the staged copy of `file` whose bytes are `bytes` and
    /// whose SHA-256 is `hash`. Writes the copy unless a good one is there;
    /// anything else under that name is removed first.
    pub fn stage(&self, file: &Path, hash: &str, bytes: &[u8]) -> Result<PathBuf, String> {
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".to_owned());
        let staged = self.dir.join(format!("{stem}-{}.so", &hash[..16]));
        match inspect(&staged, hash)? {
            Existing::Good => {
                // Reused: renew its time, so no host's cleaning takes it
                // before it is mapped.
                let renewed = File::open(&staged)
                    .and_then(|file| file.set_modified(std::time::SystemTime::now()));
                if let Err(err) = renewed {
                    tracing::debug!(staged = %staged.display(), "cannot renew its time: {err}");
                }
                return Ok(staged);
            }
            Existing::Missing => {}
            Existing::Bad(why) => {
                tracing::warn!(staged = %staged.display(), "replacing a staged file: {why}");
                // A file or symlink is replaced by the rename below, in one
                // step: other hosts of this user sharing the directory never
                // find the name missing. A directory has to go first.
                if std::fs::symlink_metadata(&staged).is_ok_and(|m| m.is_dir()) {
                    std::fs::remove_dir_all(&staged).map_err(|err| {
                        format!(
                            "{} is a directory that cannot be removed: {err}",
                            staged.display()
                        )
                    })?;
                }
            }
        }
        let tmp = self
            .dir
            .join(format!(".{stem}-{}.tmp", uuid::Uuid::new_v4().simple()));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut out| out.write_all(bytes))
            .and_then(|()| std::fs::rename(&tmp, &staged));
        written.map_err(|err| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot stage a copy in {}: {err}", self.dir.display())
        })?;
        Ok(staged)
    }

    /// Checks that `staged` is still a regular file owned by the host's user,
    /// writable by no one else, whose bytes hash to `hash`: the last check
    /// before it is mapped.
    pub fn verify(&self, staged: &Path, hash: &str) -> Result<(), String> {
        match inspect(staged, hash)? {
            Existing::Good => Ok(()),
            Existing::Missing => Err(format!("the staged copy {} is gone", staged.display())),
            Existing::Bad(why) => Err(format!(
                "the staged copy {} changed after it was written ({why}); not loaded",
                staged.display()
            )),
        }
    }
}

impl Staging {
    /// Removes the staged copies and leftover temporary files not in `keep`
    /// whose time is older than `grace`; answers how many were removed.
    /// Anything else in the directory is left alone.
    pub fn clean(&self, keep: &BTreeSet<PathBuf>, grace: Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = (name.ends_with(".so") && !name.starts_with('.'))
                || (name.starts_with('.') && name.ends_with(".tmp"));
            if !ours || keep.contains(&path) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let age = meta
                .modified()
                .ok()
                .and_then(|at| now.duration_since(at).ok());
            if !meta.is_file() || age.is_none_or(|age| age < grace) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    removed += 1;
                    tracing::debug!(staged = %path.display(), "removed an unused staged copy");
                }
                Err(err) => {
                    tracing::warn!(staged = %path.display(), "cannot remove an unused staged copy: {err}")
                }
            }
        }
        removed
    }
}

/// Whether `meta` (of `dir`, not following a symlink) is a directory that
/// only user `euid` can enter.
fn check_private_dir(dir: &Path, meta: &std::fs::Metadata, euid: u32) -> Result<(), String> {
    let shown = dir.display();
    if meta.file_type().is_symlink() {
        return Err(format!(
            "the staging directory {shown} is a symbolic link; the host stages plugin \
             libraries only in a real directory of its own. Remove the link, or set \
             plugins.staging_dir to a directory that only this user can write"
        ));
    }
    if !meta.is_dir() {
        return Err(format!(
            "the staging directory {shown} exists and is not a directory; remove it, or set \
             plugins.staging_dir to another path"
        ));
    }
    let mode = meta.mode() & 0o7777;
    if meta.uid() != euid {
        return Err(format!(
            "the staging directory {shown} is owned by uid {} (mode {mode:04o}), not by the \
             user the host runs as (uid {euid}); whoever owns it could replace the libraries \
             the host loads. Remove it, or set plugins.staging_dir to a directory of this \
             user with mode 0700",
            meta.uid()
        ));
    }
    if mode & 0o077 != 0 {
        return Err(format!(
            "the staging directory {shown} has mode {mode:04o}: group or others have access, \
             and the host loads code from it. Make it private (chmod 700 {shown}), or set \
             plugins.staging_dir to a directory with mode 0700"
        ));
    }
    Ok(())
}

/// Whether others could rename `dir` away through its `parent`.
fn check_parent(dir: &Path, parent: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(format!(
            "the staging directory {} is in {}, which group or others may write (mode \
             {mode:04o}) and which has no sticky bit: they could move the staging directory \
             away and put their own in its place. Set plugins.staging_dir to a directory \
             whose parent only this user (or root) can write",
            dir.display(),
            parent.display()
        ));
    }
    Ok(())
}

/// What is under `staged`, checked without following a symlink. Another
/// host of this user may rename a fresh copy over it meanwhile; that is
/// retried rather than taken for tampering.
fn inspect(staged: &Path, hash: &str) -> Result<Existing, String> {
    for _ in 0..3 {
        if let Some(existing) = inspect_once(staged, hash)? {
            return Ok(existing);
        }
    }
    Ok(Existing::Bad(
        "it kept being replaced while being checked".to_owned(),
    ))
}

/// [`inspect`], once; `None` when the name was replaced during the check.
fn inspect_once(staged: &Path, hash: &str) -> Result<Option<Existing>, String> {
    let meta = match std::fs::symlink_metadata(staged) {
        Ok(meta) => meta,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Some(Existing::Missing)),
        Err(err) => return Err(format!("cannot inspect {}: {err}", staged.display())),
    };
    if meta.file_type().is_symlink() {
        return Ok(Some(Existing::Bad("it is a symbolic link".to_owned())));
    }
    if !meta.is_file() {
        return Ok(Some(Existing::Bad("it is not a regular file".to_owned())));
    }
    let me = euid();
    if meta.uid() != me {
        return Ok(Some(Existing::Bad(format!(
            "it is owned by uid {}, not {me}",
            meta.uid()
        ))));
    }
    if meta.mode() & 0o022 != 0 {
        return Ok(Some(Existing::Bad(format!(
            "group or others may write it (mode {:04o})",
            meta.mode() & 0o7777
        ))));
    }
    // O_NOFOLLOW: if the name became a symlink since the check, fail instead
    // of reading through it.
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(staged)
    {
        Ok(file) => file,
        // Renamed over (by another host) between the two looks.
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Ok(Some(Existing::Bad(format!("it cannot be opened: {err}")))),
    };
    let opened = file
        .metadata()
        .map_err(|err| format!("cannot inspect {}: {err}", staged.display()))?;
    if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
        return Ok(None);
    }
    let digest =
        hash_reader(&mut file).map_err(|err| format!("cannot read {}: {err}", staged.display()))?;
    if digest != hash {
        return Ok(Some(Existing::Bad(format!(
            "its content (sha256 {}) does not match its name",
            &digest[..16]
        ))));
    }
    Ok(Some(Existing::Good))
}

fn hash_reader(file: &mut File) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 16];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    fn tempdir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("llm-host-staging-test-{}", uuid::Uuid::new_v4()));
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .expect("create a private test directory");
        dir
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
    }

    #[test]
    fn a_new_staging_directory_is_private() {
        let root = tempdir();
        let staging = Staging::new(root.join("a").join("staging"));
        staging.prepare().expect("created");
        assert_eq!(mode(staging.dir()), 0o700);
        assert_eq!(mode(&root.join("a")), 0o700);
        // Preparing again accepts it.
        staging.prepare().expect("accepted");
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn a_staging_directory_open_to_others_is_refused() {
        let root = tempdir();
        for bad in [0o755, 0o777, 0o750, 0o701] {
            let dir = root.join(format!("staging-{bad:o}"));
            DirBuilder::new().create(&dir).expect("mkdir");
            chmod(&dir, bad);
            let err = Staging::new(dir.clone()).prepare().expect_err("refused");
            assert!(err.contains(&dir.display().to_string()), "{err}");
            assert!(err.contains(&format!("{bad:04o}")), "{err}");
            assert!(err.contains("chmod 700"), "{err}");
        }
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn a_staging_directory_of_another_user_is_refused() {
        let root = tempdir();
        let meta = std::fs::symlink_metadata(&root).expect("stat");
        let err = check_private_dir(&root, &meta, meta.uid() + 1).expect_err("refused");
        assert!(
            err.contains(&format!("owned by uid {}", meta.uid())),
            "{err}"
        );
        assert!(err.contains("plugins.staging_dir"), "{err}");
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn a_symlinked_staging_directory_is_refused() {
        let root = tempdir();
        let real = root.join("real");
        DirBuilder::new().mode(0o700).create(&real).expect("mkdir");
        let link = root.join("link");
        symlink(&real, &link).expect("symlink");
        let err = Staging::new(link).prepare().expect_err("refused");
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn a_parent_others_may_write_needs_the_sticky_bit() {
        let root = tempdir();
        let parent = root.join("shared");
        DirBuilder::new().create(&parent).expect("mkdir");
        chmod(&parent, 0o777);
        let err = Staging::new(parent.join("staging"))
            .prepare()
            .expect_err("refused");
        assert!(err.contains("sticky"), "{err}");
        chmod(&parent, 0o1777);
        Staging::new(parent.join("staging"))
            .prepare()
            .expect("a sticky parent is fine");
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn staging_writes_a_private_copy_named_by_its_hash() {
        let root = tempdir();
        let staging = Staging::new(root.join("staging"));
        staging.prepare().expect("prepared");
        let bytes = b"library bytes".to_vec();
        let hash = sha256_hex(&bytes);
        let staged = staging
            .stage(Path::new("/plugins/libx.so"), &hash, &bytes)
            .expect("staged");
        assert_eq!(
            staged,
            staging.dir().join(format!("libx-{}.so", &hash[..16]))
        );
        assert_eq!(std::fs::read(&staged).expect("read"), bytes);
        assert_eq!(mode(&staged), 0o600);
        staging.verify(&staged, &hash).expect("verified");
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(staging.dir())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn a_planted_file_under_the_staged_name_is_replaced() {
        let root = tempdir();
        let staging = Staging::new(root.join("staging"));
        staging.prepare().expect("prepared");
        let bytes = b"the real library".to_vec();
        let hash = sha256_hex(&bytes);
        let name = staging.dir().join(format!("libx-{}.so", &hash[..16]));

        // Other content under the expected name.
        std::fs::write(&name, b"planted").expect("plant");
        assert!(staging.verify(&name, &hash).is_err());
        let staged = staging
            .stage(Path::new("libx.so"), &hash, &bytes)
            .expect("staged");
        assert_eq!(std::fs::read(&staged).expect("read"), bytes);

        // The right content, but writable by others.
        chmod(&name, 0o666);
        assert!(staging.verify(&name, &hash).is_err());
        staging
            .stage(Path::new("libx.so"), &hash, &bytes)
            .expect("staged");
        assert_eq!(mode(&name), 0o600);

        // A symlink to a file with the right content, outside.
        let outside = root.join("outside.so");
        std::fs::write(&outside, &bytes).expect("write outside");
        std::fs::remove_file(&name).expect("remove");
        symlink(&outside, &name).expect("symlink");
        assert!(staging.verify(&name, &hash).is_err());
        staging
            .stage(Path::new("libx.so"), &hash, &bytes)
            .expect("staged");
        assert!(std::fs::symlink_metadata(&name).expect("stat").is_file());
        assert_eq!(
            std::fs::read(&outside).expect("read"),
            bytes,
            "the target is untouched"
        );

        // A dangling symlink: nothing is created at its target.
        let target = root.join("never-created");
        std::fs::remove_file(&name).expect("remove");
        symlink(&target, &name).expect("symlink");
        staging
            .stage(Path::new("libx.so"), &hash, &bytes)
            .expect("staged");
        assert!(!target.exists(), "written through a symlink");
        assert!(std::fs::symlink_metadata(&name).expect("stat").is_file());

        // A directory.
        std::fs::remove_file(&name).expect("remove");
        std::fs::create_dir(&name).expect("mkdir");
        std::fs::write(name.join("inside"), b"x").expect("write");
        staging
            .stage(Path::new("libx.so"), &hash, &bytes)
            .expect("staged");
        assert_eq!(std::fs::read(&name).expect("read"), bytes);
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn cleaning_removes_old_unused_copies_only() {
        let dir = tempdir();
        let staging = Staging::new(dir.join("staging"));
        staging.prepare().expect("prepare");
        let bytes = b"library bytes";
        let hash = sha256_hex(bytes);
        let kept = staging
            .stage(Path::new("libkept.so"), &hash, bytes)
            .expect("stage");
        let other = b"another library";
        let unused = staging
            .stage(Path::new("libold.so"), &sha256_hex(other), other)
            .expect("stage");
        let leftover = staging.dir().join(".libold-0123.tmp");
        std::fs::write(&leftover, b"half").expect("write");
        let foreign = staging.dir().join("notes.txt");
        std::fs::write(&foreign, b"not ours").expect("write");
        let keep = BTreeSet::from([kept.clone()]);
        // Within the grace period nothing goes.
        assert_eq!(staging.clean(&keep, Duration::from_secs(600)), 0);
        assert!(unused.exists() && leftover.exists());
        assert_eq!(staging.clean(&keep, Duration::ZERO), 2);
        assert!(kept.exists(), "the copy in use stays");
        assert!(!unused.exists() && !leftover.exists());
        assert!(foreign.exists(), "files that are not copies are left alone");
    }

    #[test]
    fn the_temporary_name_is_never_written_through() {
        // A writer that opens exclusively fails on any planted entry rather
        // than following it; this is what `stage` relies on.
        let root = tempdir();
        let target = root.join("target");
        let planted = root.join("planted.tmp");
        symlink(&target, &planted).expect("symlink");
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&planted);
        assert_eq!(
            opened.expect_err("refused").kind(),
            ErrorKind::AlreadyExists
        );
        assert!(!target.exists());
        std::fs::remove_dir_all(root).ok();
    }
}
