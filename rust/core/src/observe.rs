//! What the supervisor sees of limits the kernel enforces without counting: an rlimit has no
//! event counter, so the only trustworthy evidence is the supervisor's own view of the
//! sandbox's processes in the host's /proc (never anything the sandbox says).
//!
//! RLIMIT_NPROC refuses a fork when the forking user already has `limit` tasks; seeing that
//! many processes of one user in the sandbox's tree proves the limit was reached. Samples can
//! miss a short peak, so not seeing it proves nothing (the limit stays unverified).
//! RLIMIT_DATA refuses an allocation before it happens: nothing in /proc shows the attempt,
//! so a memory rlimit is always reported unverified.

use crate::report::Enforcer;
use crate::spec::Limits;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// How often the sandbox's processes are counted while a pids rlimit is in force.
/// (A sample reads every /proc/<pid>/stat of the host: ~1-5 ms with a few hundred processes.)
pub const PIDS_POLL: Duration = Duration::from_millis(50);

/// Samples the number of processes under a pids rlimit.
#[derive(Debug)]
pub struct PidsWatch {
    root: libc::pid_t,
    limit: u64,
    next: Instant,
    /// Whether one user's processes in the sandbox were seen at the limit.
    pub reached: bool,
}

impl PidsWatch {
    /// A watch of the tree under host pid `root` when `pids` is enforced by an rlimit.
    pub fn new(
        root: libc::pid_t,
        limits: &Limits,
        enforcement: &BTreeMap<String, Option<Enforcer>>,
    ) -> Option<PidsWatch> {
        let limit = limits.pids?;
        (enforcement.get("pids") == Some(&Some(Enforcer::Rlimit)) && root > 0).then(|| PidsWatch {
            root,
            limit,
            next: Instant::now(),
            reached: false,
        })
    }

    /// How long until the next sample is due (zero once seen: no more sampling needed).
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        (!self.reached).then(|| self.next.saturating_duration_since(now))
    }

    /// Samples when due.
    pub fn tick(&mut self, now: Instant) {
        if self.reached || now < self.next {
            return;
        }
        self.next = now + PIDS_POLL;
        let tree = process_tree(self.root);
        // Fewer processes than the limit cannot reach it: no need to read their owners.
        if tree.len() as u64 >= self.limit && largest_user_count(&tree) >= self.limit {
            self.reached = true;
        }
    }
}

/// The largest number of processes of one real uid among `pids` (host pids), read from the
/// host's /proc. Threads are not counted (their credentials can differ): the count never
/// exceeds what the kernel counts.
pub fn largest_user_count(pids: &[libc::pid_t]) -> u64 {
    let mut per_uid: HashMap<u32, u64> = HashMap::new();
    for uid in pids.iter().filter_map(|p| real_uid(*p)) {
        *per_uid.entry(uid).or_insert(0) += 1;
    }
    per_uid.values().copied().max().unwrap_or(0)
}

/// The host pids of the process tree rooted at host pid `root` (itself included), from the
/// parent links in the host's /proc.
pub fn process_tree(root: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: HashMap<libc::pid_t, Vec<libc::pid_t>> = HashMap::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if let Some(ppid) = parent_of(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut tree = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        // Each pid is visited once (its entry is taken): the walk ends.
        tree.push(pid);
        if let Some(kids) = children.remove(&pid) {
            todo.extend(kids);
        }
    }
    tree
}

/// The parent pid of `pid` (field 4 of /proc/<pid>/stat).
fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The real uid of `pid` as the host sees it (first field of `Uid:` in /proc/<pid>/status).
fn real_uid(pid: libc::pid_t) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_a_forked_tree() {
        // Three children of this process: this process plus three, all of our uid.
        let kids: Vec<std::process::Child> = (0..3)
            .filter_map(|_| std::process::Command::new("sleep").arg("5").spawn().ok())
            .collect();
        assert_eq!(kids.len(), 3);
        let n = largest_user_count(&process_tree(std::process::id() as libc::pid_t));
        for mut k in kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        assert!(n >= 4, "{n}");
    }
}
