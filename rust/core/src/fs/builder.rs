//! Turning layout decisions into steps: [`Builder`] places mount points, binds and generated
//! files under the new root (or, with a rootfs, into the overlay's top layer), and the rootfs
//! overlay's own steps.

use super::op::{Op, MS_MOUNT_ATTR_NODEV, MS_MOUNT_ATTR_NOSUID, MS_MOUNT_ATTR_RDONLY};
use crate::error::{Error, Result};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub(super) fn cstr(s: impl AsRef<[u8]>) -> Result<CString> {
    CString::new(s.as_ref().to_vec())
        .map_err(|_| Error::InvalidSpec("path contains a NUL byte".into()))
}

/// Path under the new root.
pub(super) fn under(base: &str, path: &str) -> String {
    format!("{base}{path}")
}

/// Characters that would end or split a path inside overlayfs's option string.
const OVERLAY_OPTION_CHARS: &[char] = &[',', ':', '\\', '=', '\n'];

/// Refuses a rootfs overlayfs cannot take or that is not a directory.
pub(super) fn check_rootfs(rootfs: &str) -> Result<()> {
    let path = Path::new(rootfs);
    if !path.is_absolute() {
        return Err(Error::InvalidSpec(format!(
            "rootfs: {rootfs:?} is not absolute"
        )));
    }
    if rootfs.contains(OVERLAY_OPTION_CHARS) {
        return Err(Error::InvalidSpec(format!(
            "rootfs: {rootfs:?} contains one of , : \\ = or a newline (overlayfs cannot take it)"
        )));
    }
    if !path.is_dir() {
        return Err(Error::InvalidSpec(format!(
            "rootfs: {rootfs:?} is not a directory"
        )));
    }
    Ok(())
}

/// The steps that come before the rest with a rootfs: the tmpfs on `host_base`, the `gen`
/// layer's directories and files (`pre`), then the overlay of `gen` over `rootfs` on `root`.
/// No upper layer: the overlay is read-only, and entries of `gen` hide whatever the rootfs
/// has at those names (a symlink where the plan needs a directory is never followed).
pub(super) fn overlay_ops(
    host_base: &str,
    gen: &str,
    root: &str,
    rootfs: &str,
    pre: Vec<Op>,
) -> Result<Vec<Op>> {
    let mut ops = vec![
        Op::Mount {
            src: None,
            dst: cstr(host_base)?,
            fstype: Some(cstr("tmpfs")?),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: Some(cstr("size=1m,mode=0755")?),
        },
        Op::Mkdir(cstr(gen)?, 0o755),
        Op::Mkdir(cstr(root)?, 0o755),
    ];
    ops.extend(pre);
    // nosuid and nodev: a setuid file or a device node in the rootfs is inert.
    ops.push(Op::Mount {
        src: Some(cstr("overlay")?),
        dst: cstr(root)?,
        fstype: Some(cstr("overlay")?),
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some(cstr(format!("lowerdir={gen}:{rootfs}"))?),
    });
    Ok(ops)
}

pub(super) struct Builder<'a> {
    pub(super) base: &'a str,
    /// With a rootfs: the top layer's directory, where mount points and generated files are
    /// made (into `pre`) before the read-only overlay is mounted.
    pub(super) gen: Option<&'a str>,
    pub(super) pre: &'a mut Vec<Op>,
    pub(super) ops: &'a mut Vec<Op>,
}

impl Builder<'_> {
    pub(super) fn mkdir_p(&mut self, path: &str) -> Result<()> {
        let mut cur = String::new();
        for part in path.split('/').filter(|s| !s.is_empty()) {
            cur.push('/');
            cur.push_str(part);
            if let Some(gen) = self.gen {
                self.pre.push(Op::Mkdir(cstr(under(gen, &cur))?, 0o755));
            }
            // With a rootfs this exists already (from gen: EEXIST), unless it is inside a
            // tmpfs mounted on the overlay (/dev/shm).
            self.ops
                .push(Op::Mkdir(cstr(under(self.base, &cur))?, 0o755));
        }
        Ok(())
    }

    /// Makes an empty directory (mode 0555) to bind read-only over masked directories and
    /// returns its path on the host side of the mounts: in the root's tmpfs, or with a rootfs
    /// in the staging tmpfs beside the overlay (in the overlay's top layer it would be merged
    /// with a directory of the same name in the rootfs, whose entries would then show).
    pub(super) fn empty_dir(&mut self, name: &str) -> Result<String> {
        let path = match self.gen.and_then(|g| Path::new(g).parent()) {
            Some(staging) => format!("{}/{}", staging.display(), name.trim_start_matches('/')),
            None => under(self.base, name),
        };
        self.ops.push(Op::Mkdir(cstr(&path)?, 0o555));
        Ok(path)
    }

    /// A generated file (mode 0644): in the root's tmpfs, or in the rootfs's top layer.
    pub(super) fn write(&mut self, path: &str, data: Vec<u8>) -> Result<()> {
        match self.gen {
            Some(gen) => self.pre.push(Op::Write(cstr(under(gen, path))?, data)),
            None => self
                .ops
                .push(Op::Write(cstr(under(self.base, path))?, data)),
        }
        Ok(())
    }

    pub(super) fn mount(
        &mut self,
        src: Option<&str>,
        dst: &str,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> Result<()> {
        self.ops.push(Op::Mount {
            src: src.map(cstr).transpose()?,
            dst: cstr(under(self.base, dst))?,
            fstype: fstype.map(cstr).transpose()?,
            flags,
            data: data.map(cstr).transpose()?,
        });
        Ok(())
    }

    /// Bind `src` (host path, or a path under the new root when `src_in_root`) onto `dst`.
    pub(super) fn bind(
        &mut self,
        src: &str,
        dst: &str,
        readonly: bool,
        src_in_root: bool,
    ) -> Result<()> {
        let src_path = if src_in_root {
            under(self.base, src)
        } else {
            src.to_string()
        };
        self.ops.push(Op::Mount {
            src: Some(cstr(src_path)?),
            dst: cstr(under(self.base, dst))?,
            fstype: None,
            flags: libc::MS_BIND | libc::MS_REC,
            data: None,
        });
        if readonly {
            self.ops.push(Op::SetAttr(
                cstr(under(self.base, dst))?,
                MS_MOUNT_ATTR_RDONLY | MS_MOUNT_ATTR_NOSUID | MS_MOUNT_ATTR_NODEV,
                true,
            ));
        }
        Ok(())
    }

    /// Mirror a host path read-only: directories and files are bound, symlinks recreated.
    pub(super) fn bind_host(&mut self, path: &str) -> Result<()> {
        let Ok(meta) = Path::new(path).symlink_metadata() else {
            return Ok(());
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path).map_err(|e| Error::Setup {
                stage: "readlink",
                source: e,
            })?;
            self.ops.push(Op::Symlink(
                cstr(target.as_os_str().as_bytes())?,
                cstr(under(self.base, path))?,
            ));
        } else if meta.is_dir() {
            self.mkdir_p(path)?;
            self.bind(path, path, true, false)?;
        } else {
            self.ops.push(Op::Touch(cstr(under(self.base, path))?));
            self.bind(path, path, true, false)?;
        }
        Ok(())
    }
}
