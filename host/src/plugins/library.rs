//! Reading a library file from the plugin directory: who could have written
//! it, and whether it is a whole plugin library.
//!
//! A library the host loads runs as the host's user, so a file that another
//! user could have written is refused: one owned by anyone but the host's
//! effective user or root, or writable by group or others. A symlink in the
//! plugin directory is followed, and these checks apply to the file it
//! resolves to; errors name both paths. The file is opened once and checked
//! with `fstat` on that open file, so the bytes read are the bytes of the
//! file that was checked.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::staging::{euid, sha256_hex};

/// The symbol every plugin library exports (the root module's header).
const ROOT_SYMBOL: &[u8] = b"_1as_0lib_1header_0root_bmodule_bloader";

/// A library file read from the plugin directory, checked.
pub struct Library {
    /// The path in the plugin directory (a symlink's own path).
    pub file: PathBuf,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// SHA-256 of the bytes, hex.
    pub hash: String,
}

/// The `lib*.so` entries of `dir`, sorted: files and symlinks (whatever
/// they point to), not directories.
pub fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let kind = entry.file_type().ok()?;
            let path = entry.path();
            (is_library_name(&path) && (kind.is_file() || kind.is_symlink())).then_some(path)
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Whether `path` is named like a plugin library (`lib*.so`).
pub fn is_library_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|name| name.starts_with("lib") && name.ends_with(".so"))
}

/// Warns when users other than the host's could add or replace libraries in
/// the plugin directory `dir`: each library they add is refused (it is
/// theirs), but they could also remove or rename the operator's.
pub fn check_dir(dir: &Path) {
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            "the plugin directory is writable by {} (mode {mode:04o}): they can remove or \
             rename plugin libraries (files they add are refused as not the host's); \
             chmod go-w {}",
            who(mode),
            dir.display()
        );
    }
}

/// Opens `file` (following a symlink), checks who could have written the
/// file it resolves to, and reads it.
pub fn read(file: &Path) -> Result<Library, String> {
    let is_link = std::fs::symlink_metadata(file)
        .map(|meta| meta.file_type().is_symlink())
        .unwrap_or(false);
    // How the message names the file checked: a symlink's target too.
    let checked = if is_link {
        let target = std::fs::canonicalize(file)
            .or_else(|_| std::fs::read_link(file))
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "an unreadable target".to_owned());
        format!("its symlink target {target}")
    } else {
        "it".to_owned()
    };
    let mut opened =
        std::fs::File::open(file).map_err(|err| format!("cannot read {checked}: {err}"))?;
    let meta = opened
        .metadata()
        .map_err(|err| format!("cannot inspect {checked}: {err}"))?;
    check_file(&checked, &meta, euid())?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    opened
        .read_to_end(&mut bytes)
        .map_err(|err| format!("cannot read {checked}: {err}"))?;
    let hash = sha256_hex(&bytes);
    Ok(Library {
        file: file.to_owned(),
        bytes,
        hash,
    })
}

/// Whether a library file (`checked`, as messages name it) with `meta`
/// could only have been written by the host's user (`euid`) or root.
fn check_file(checked: &str, meta: &std::fs::Metadata, euid: u32) -> Result<(), String> {
    if !meta.is_file() {
        return Err(format!("{checked} is not a regular file"));
    }
    let owner = meta.uid();
    if owner != euid && owner != 0 {
        return Err(format!(
            "refused: {checked} is owned by uid {owner}, neither the user the host runs as \
             (uid {euid}) nor root, and a loaded library runs as the host's user. Remove it, \
             or have it owned by uid {euid} or root"
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "refused: {checked} is writable by {} (mode {mode:04o}), who could put code in \
             the host. chmod go-w it",
            who(mode)
        ));
    }
    Ok(())
}

fn who(mode: u32) -> &'static str {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => "group and others",
        (true, false) => "group",
        _ => "others",
    }
}

/// Checks that `bytes` is a whole ELF shared library (every segment and
/// section lies inside the file: a half-copied library passes `dlopen` and
/// crashes on first call) and answers whether it exports the plugin root
/// module.
pub fn exports_root_module(bytes: &[u8]) -> Result<bool, String> {
    use object::read::elf::ElfFile64;
    use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

    if !bytes.starts_with(b"\x7fELF") {
        return Err("not an ELF shared library".to_owned());
    }
    let elf = ElfFile64::<object::Endianness>::parse(bytes)
        .map_err(|err| format!("not a readable 64-bit ELF library ({err}); truncated?"))?;
    let len = bytes.len() as u64;
    let inside =
        |(offset, size): (u64, u64)| offset.checked_add(size).is_some_and(|end| end <= len);
    if let Some(segment) = elf.segments().find(|s| !inside(s.file_range())) {
        let (offset, size) = segment.file_range();
        return Err(format!(
            "truncated: a segment ends at byte {} but the file has {len} bytes \
             (still being written? copy to a temporary name, then mv)",
            offset + size
        ));
    }
    if elf
        .sections()
        .filter_map(|s| s.file_range())
        .any(|range| !inside(range))
    {
        return Err(format!(
            "truncated: a section lies past the end of the file ({len} bytes)"
        ));
    }
    Ok(elf
        .dynamic_symbols()
        .any(|symbol| symbol.name_bytes().is_ok_and(|name| name == ROOT_SYMBOL)))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    fn tempdir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("llm-host-library-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).expect("mkdir");
        dir
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn files_others_could_write_are_refused() {
        let dir = tempdir();
        let file = dir.join("libx.so");
        std::fs::write(&file, b"bytes").expect("write");
        chmod(&file, 0o644);
        assert_eq!(read(&file).expect("accepted").bytes, b"bytes");
        chmod(&file, 0o664);
        let err = read(&file).err().expect("refused");
        assert!(
            err.contains("writable by group") && err.contains("0664"),
            "{err}"
        );
        chmod(&file, 0o646);
        let err = read(&file).err().expect("refused");
        assert!(err.contains("writable by others"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn files_of_another_user_are_refused_and_roots_accepted() {
        let dir = tempdir();
        let file = dir.join("libx.so");
        std::fs::write(&file, b"bytes").expect("write");
        chmod(&file, 0o644);
        let meta = std::fs::metadata(&file).expect("stat");
        let mine = meta.uid();
        if mine == 0 {
            // Root's files are accepted whoever the host runs as.
            check_file("it", &meta, 1000).expect("accepted");
            // Root can give the file away: then it is refused.
            std::os::unix::fs::chown(&file, Some(54321), None).expect("chown");
            let meta = std::fs::metadata(&file).expect("stat");
            let err = check_file("it", &meta, 0).expect_err("refused");
            assert!(err.contains("uid 54321"), "{err}");
        } else {
            let err = check_file("it", &meta, mine + 1).expect_err("refused");
            assert!(err.contains(&format!("uid {mine}")), "{err}");
        }
        check_file("it", &std::fs::metadata(&dir).expect("stat"), euid())
            .expect_err("a directory is not a library");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_symlink_is_checked_at_its_target_and_both_are_named() {
        let dir = tempdir();
        let target = dir.join("elsewhere.so");
        std::fs::write(&target, b"bytes").expect("write");
        chmod(&target, 0o666);
        let link = dir.join("libx.so");
        symlink(&target, &link).expect("symlink");
        let err = read(&link).err().expect("refused");
        let target = std::fs::canonicalize(&target).expect("canonical");
        assert!(err.contains(&target.display().to_string()), "{err}");
        chmod(&target, 0o644);
        assert_eq!(read(&link).expect("accepted").file, link);
        assert_eq!(list(&dir).expect("list"), vec![link]);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn only_lib_so_names_are_listed() {
        let dir = tempdir();
        for name in ["libx.so", "x.so", "libx.so.tmp", ".libx.so.tmp"] {
            std::fs::write(dir.join(name), b"").expect("write");
        }
        std::fs::create_dir(dir.join("libdir.so")).expect("mkdir");
        assert_eq!(list(&dir).expect("list"), vec![dir.join("libx.so")]);
        std::fs::remove_dir_all(dir).ok();
    }
}
