//! Tests of the mount plan: what the sandbox sees of the host, in what order.

use super::*;

fn plan() -> MountPlan {
    MountPlan::build(&PlanInput {
        disk: 1 << 20,
        owner: 0,
        ro_binds: &[],
        rootfs: None,
        resolv_conf: "",
    })
    .expect("plan")
}

fn descriptions(p: &MountPlan) -> Vec<String> {
    p.ops.iter().map(Op::describe).collect()
}

#[test]
fn plan_never_exposes_secrets_of_etc() {
    let d = descriptions(&plan()).join("\n");
    for bad in ["/etc/shadow", "/etc/gshadow", "/etc/ssh", "/etc/sudoers"] {
        assert!(
            !d.contains(&format!("mount {bad} ")),
            "{bad} is bound:\n{d}"
        );
    }
    assert!(d.contains("write /"));
}

#[test]
fn plan_has_no_host_home_or_work() {
    let d = descriptions(&plan()).join("\n");
    for bad in [
        "mount /root",
        "mount /home",
        "mount /work",
        "mount /var/run",
        "mount /run",
    ] {
        assert!(!d.contains(bad), "{bad}:\n{d}");
    }
}

#[test]
fn system_binds_are_read_only() {
    let p = plan();
    for (i, op) in p.ops.iter().enumerate() {
        if let Op::Mount {
            src: Some(src),
            fstype: None,
            ..
        } = op
        {
            let s = src.to_string_lossy();
            if s == "/usr" {
                assert!(
                    matches!(&p.ops[i + 1], Op::SetAttr(_, a, true) if a & MS_MOUNT_ATTR_RDONLY != 0)
                );
            }
        }
    }
}

#[test]
fn host_describing_proc_entries_are_masked_after_proc_is_mounted() {
    let d = descriptions(&plan());
    let proc_at = d
        .iter()
        .position(|l| l.starts_with("mount proc on ") && l.ends_with("/proc (proc)"))
        .expect("proc is mounted");
    let null_at = d
        .iter()
        .position(|l| l.contains("/dev/null on ") && l.ends_with("/proc/cmdline (bind)"))
        .expect("/proc/cmdline is masked");
    assert!(proc_at < null_at, "{d:?}");
    // Only entries the kernel has are masked (a missing mount point would fail the run).
    let mut b_ops = Vec::new();
    let mut pre = Vec::new();
    let mut b = Builder {
        base: "/mnt",
        gen: None,
        pre: &mut pre,
        ops: &mut b_ops,
    };
    mask_host_proc(&mut b, |n| n == "cmdline" || n == "acpi").expect("masks");
    let masked: Vec<String> = b_ops.iter().map(Op::describe).collect();
    assert_eq!(
        masked,
        [
            "mount /mnt/dev/null on /mnt/proc/cmdline (bind)",
            "mkdir /mnt/.cellblock-empty-dir",
            "mount /mnt/.cellblock-empty-dir on /mnt/proc/acpi (bind)",
            "set mount attributes of /mnt/proc/acpi",
        ]
    );
}

#[test]
fn with_a_rootfs_the_empty_directory_is_beside_the_overlay_not_in_it() {
    // In the overlay's top layer it would be merged with the rootfs's directory of that name.
    let (mut ops, mut pre) = (Vec::new(), Vec::new());
    let mut b = Builder {
        base: "/mnt/.root",
        gen: Some("/mnt/.gen"),
        pre: &mut pre,
        ops: &mut ops,
    };
    mask_host_proc(&mut b, |n| n == "acpi").expect("masks");
    assert!(pre.is_empty(), "nothing goes into the top layer");
    let masked: Vec<String> = ops.iter().map(Op::describe).collect();
    assert_eq!(
        masked,
        [
            "mkdir /mnt/.cellblock-empty-dir",
            "mount /mnt/.cellblock-empty-dir on /mnt/.root/proc/acpi (bind)",
            "set mount attributes of /mnt/.root/proc/acpi",
        ]
    );
}

#[test]
fn dev_pts_is_a_private_devpts_instance_with_ptmx_linked() {
    let p = plan();
    let devpts = p
        .ops
        .iter()
        .find_map(|op| match op {
            Op::Mount {
                dst,
                fstype: Some(t),
                data,
                ..
            } if t.as_bytes() == b"devpts" => Some((dst.clone(), data.clone())),
            _ => None,
        })
        .expect("devpts is mounted");
    assert!(devpts.0.to_string_lossy().ends_with("/dev/pts"));
    let data = devpts.1.expect("options").into_string().expect("utf-8");
    assert!(data.split(',').any(|o| o == "newinstance"), "{data}");
    assert!(data.split(',').any(|o| o == "ptmxmode=0666"), "{data}");
    assert!(data.split(',').any(|o| o == "max=256"), "{data}");
    let d = descriptions(&p).join("\n");
    assert!(
        d.contains("symlink /mnt/dev/ptmx -> pts/ptmx") || d.contains("/dev/ptmx -> pts/ptmx"),
        "{d}"
    );
}

#[test]
fn relative_ro_bind_is_rejected() {
    let binds = vec!["relative/dir".to_string()];
    let e = MountPlan::build(&PlanInput {
        disk: 1,
        owner: 0,
        ro_binds: &binds,
        rootfs: None,
        resolv_conf: "",
    });
    assert!(matches!(e, Err(Error::InvalidSpec(_))));
}

#[test]
fn a_rootfs_replaces_the_host_system_dirs_and_etc() {
    let dir = std::env::temp_dir().join(format!("cellblock-rootfs-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("test dir");
    let rootfs = dir.display().to_string();
    let p = MountPlan::build(&PlanInput {
        disk: 1 << 20,
        owner: 0,
        ro_binds: &[],
        rootfs: Some(&rootfs),
        resolv_conf: "",
    })
    .expect("plan");
    std::fs::remove_dir(&dir).expect("test dir");
    let d = descriptions(&p);
    let joined = d.join("\n");
    assert!(
        d.iter()
            .any(|l| l.starts_with("mount overlay on ") && l.ends_with("(overlay)")),
        "{joined}"
    );
    for host in SYSTEM_DIRS.iter().chain(&["/etc/ssl", "/etc/ld.so.cache"]) {
        assert!(
            !joined.contains(&format!("mount {host} ")),
            "{host}:\n{joined}"
        );
    }
    // Generated files and mount points are made in the top layer before the overlay is
    // mounted; nothing is written through the overlay, which has no upper layer.
    let overlay = d
        .iter()
        .position(|l| l.starts_with("mount overlay on "))
        .expect("overlay");
    let hostname = d
        .iter()
        .position(|l| l.starts_with("write ") && l.ends_with("/.gen/etc/hostname"))
        .expect("hostname is written");
    assert!(hostname < overlay, "{joined}");
    assert!(d
        .iter()
        .any(|l| l.starts_with("mkdir ") && l.ends_with("/.gen/workspace")));
    assert!(!d
        .iter()
        .any(|l| l.starts_with("write ") && l.contains("/.root/")));
    let data = p.ops.iter().find_map(|op| match op {
        Op::Mount {
            fstype: Some(t),
            data: Some(data),
            ..
        } if t.as_bytes() == b"overlay" => Some(data.to_string_lossy().into_owned()),
        _ => None,
    });
    let data = data.expect("overlay options");
    assert!(
        data.starts_with("lowerdir=") && !data.contains("upperdir"),
        "{data}"
    );
    assert!(p.base.to_string_lossy().ends_with("/.root"));
}

#[test]
fn an_unusable_rootfs_is_refused() {
    for bad in ["relative", "/no/such/rootfs", "/tmp/a,upperdir=/etc"] {
        let e = MountPlan::build(&PlanInput {
            disk: 1,
            owner: 0,
            ro_binds: &[],
            rootfs: Some(bad),
            resolv_conf: "",
        });
        assert!(matches!(e, Err(Error::InvalidSpec(_))), "{bad}");
    }
}
