//! The mount plan, cached: building one reads ~20 /etc files and stats the host's system
//! directories on every run. A cached plan is reused while none of the host paths it was made
//! from changed: their lstat (type, inode; for files also size, mtime, ctime) is compared on
//! each use, about 45 stat calls instead of reading and copying the files again.

use super::{MountPlan, PlanInput, BASE_CANDIDATES, DEVICES, ETC_ALLOW, SYSTEM_DIRS};
use crate::error::Result;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::{Arc, Mutex, OnceLock};

/// Plans kept (distinct disk sizes, owners, extra binds).
const ENTRIES: usize = 8;

/// What the plan depends on, per host path: None when the path is absent.
type Stamp = Vec<Option<[i64; 7]>>;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    disk: u64,
    owner: u32,
    ro_binds: Vec<String>,
    rootfs: Option<String>,
    resolv_conf: String,
}

struct Entry {
    key: Key,
    stamp: Stamp,
    plan: Arc<MountPlan>,
}

/// The host paths every plan reads.
fn host_paths() -> &'static [String] {
    static PATHS: OnceLock<Vec<String>> = OnceLock::new();
    PATHS.get_or_init(|| {
        let fixed = BASE_CANDIDATES
            .iter()
            .chain(SYSTEM_DIRS)
            .map(|p| p.to_string());
        let etc = ETC_ALLOW.iter().map(|n| format!("/etc/{n}"));
        let dev = DEVICES.iter().map(|d| format!("/dev/{d}"));
        fixed.chain(etc).chain(dev).collect()
    })
}

fn stat(path: &str, follow: bool) -> Option<[i64; 7]> {
    let m = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    }
    .ok()?;
    if m.file_type().is_char_device() || m.is_dir() {
        // A device node's times move with its I/O (a tty's do), a directory's with every entry
        // made in it (/tmp): the plan binds the node or directory itself, so what names it is
        // its type, inode and device number. Files are copied: their contents count.
        return Some([
            i64::from(m.mode()),
            m.ino() as i64,
            m.rdev() as i64,
            0,
            0,
            0,
            0,
        ]);
    }
    Some([
        i64::from(m.mode()),
        m.ino() as i64,
        m.size() as i64,
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ])
}

fn stamp(ro_binds: &[String], rootfs: Option<&str>) -> Stamp {
    let host = host_paths().iter().map(|p| stat(p, false));
    // A rootfs replaced by another directory (a store swapping in a new version) gets a new
    // plan: the plan's choices depend on its top-level entries.
    let root = rootfs.into_iter().map(|p| stat(p, true));
    host.chain(ro_binds.iter().map(|p| stat(p, true)))
        .chain(root)
        .collect()
}

fn cache() -> &'static Mutex<Vec<Entry>> {
    static CACHE: OnceLock<Mutex<Vec<Entry>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(Vec::new()))
}

/// [`MountPlan::build`], reusing an earlier plan for the same inputs while the host paths it
/// was made from are unchanged.
pub fn cached(input: &PlanInput<'_>) -> Result<Arc<MountPlan>> {
    let key = Key {
        disk: input.disk,
        owner: input.owner,
        ro_binds: input.ro_binds.to_vec(),
        rootfs: input.rootfs.map(str::to_string),
        resolv_conf: input.resolv_conf.to_string(),
    };
    // Stamped before building: a change during the build is seen by the next use.
    let now = stamp(input.ro_binds, input.rootfs);
    if let Ok(entries) = cache().lock() {
        if let Some(e) = entries.iter().find(|e| e.key == key && e.stamp == now) {
            return Ok(e.plan.clone());
        }
    }
    let plan = Arc::new(MountPlan::build(input)?);
    if let Ok(mut entries) = cache().lock() {
        entries.retain(|e| e.key != key);
        if entries.len() >= ENTRIES {
            entries.remove(0);
        }
        entries.push(Entry {
            key,
            stamp: now,
            plan: plan.clone(),
        });
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(binds: &[String]) -> PlanInput<'_> {
        PlanInput {
            disk: 1 << 20,
            owner: 0,
            ro_binds: binds,
            rootfs: None,
            resolv_conf: "",
        }
    }

    #[test]
    fn the_same_inputs_reuse_the_plan() {
        // A disk size no other test uses: concurrent tests cannot replace this entry.
        let unique = PlanInput {
            disk: (1 << 20) + 4093,
            ..input(&[])
        };
        let a = cached(&unique).expect("test value");
        let b = cached(&unique).expect("test value");
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn a_changed_bind_source_rebuilds_the_plan() {
        let dir = std::env::temp_dir().join(format!("cellblock-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test value");
        let binds = vec![dir.display().to_string()];
        let a = cached(&input(&binds)).expect("test value");
        // Replacing the directory changes its inode: the old plan must not be reused.
        std::fs::remove_dir(&dir).expect("test value");
        std::fs::create_dir(std::env::temp_dir().join("cellblock-plan-spacer")).ok();
        std::fs::create_dir(&dir).expect("test value");
        let b = cached(&input(&binds)).expect("test value");
        std::fs::remove_dir(&dir).expect("test value");
        std::fs::remove_dir(std::env::temp_dir().join("cellblock-plan-spacer")).ok();
        assert!(!Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn a_missing_bind_source_is_still_an_error() {
        let binds = vec!["/no/such/dir/cellblock".to_string()];
        assert!(cached(&input(&binds)).is_err());
    }
}
