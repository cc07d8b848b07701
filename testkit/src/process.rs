//! The process plumbing shared by the services and the cluster: pid files, liveness,
//! signals, bounded waits, state-dir locks, log files and external tools.
//!
//! Processes the harness starts outlive the command that started them (`cargo xtask
//! cluster up` returns, the nodes run on), so a later command finds them through a pid
//! file and checks the pid's command line before signalling it: a stale pid file must
//! never make us kill a stranger. No libc: signals go through `kill(1)`, liveness and
//! command lines through `/proc`. Files std opens are close-on-exec, so a daemon we spawn
//! never holds our lock or a pipe a caller reads to its end.

use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Prints a progress line `[tag] message` on stdout.
pub(crate) fn log(tag: &str, message: impl std::fmt::Display) {
    println!("[{tag}] {message}");
}

/// Prints `[tag] WARNING: message` on stderr.
pub(crate) fn warn(tag: &str, message: impl std::fmt::Display) {
    eprintln!("[{tag}] WARNING: {message}");
}

/// True if the process exists and is not a zombie (a child killed but not yet reaped).
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')', comm may hold anything.
    stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
}

/// True if the process is stopped (SIGSTOP, state `T`).
pub(crate) fn pid_stopped(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
}

/// True if the process's command line contains `text` (guards against pid reuse).
pub(crate) fn cmdline_has(pid: u32, text: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " ").contains(text))
        .unwrap_or(false)
}

/// The pid in a pid file, if it holds one.
pub(crate) fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

pub(crate) fn write_pid(path: &Path, pid: u32) -> Result<()> {
    std::fs::write(path, format!("{pid}\n")).map_err(Error::io(format!("write {}", path.display())))
}

/// Polls `ready` every `interval` until it is true (true) or `within` has passed (false).
pub(crate) fn wait_until(within: Duration, interval: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}

/// Sends `signal` (TERM, KILL, QUIT) to `pid`; false if it could not be sent.
pub(crate) fn signal(pid: u32, signal: &str) -> bool {
    command("kill")
        .args(["-s", signal, &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Signals `pid` and waits up to `within` for it to die; then SIGKILL and 10 s more.
/// Returns false if it still lives.
pub(crate) fn stop_pid(tag: &str, what: &str, pid: u32, first: &str, within: Duration) -> bool {
    stop_pid_resuming(tag, what, pid, first, false, within)
}

/// [`stop_pid`] for a process that may be frozen: with `resume`, SIGCONT follows the first
/// signal, so that a SIGTERM is acted on (a stopped process only queues it). Sent once:
/// a second SIGTERM may cut a node's ordered shutdown short.
pub(crate) fn stop_pid_resuming(tag: &str, what: &str, pid: u32, first: &str, resume: bool, within: Duration) -> bool {
    signal(pid, first);
    if resume {
        signal(pid, "CONT");
    }
    if wait_until(within, Duration::from_millis(200), || !pid_alive(pid)) {
        return true;
    }
    warn(tag, format!("{what}: pid {pid} still alive {}s after SIG{first}; SIGKILL", within.as_secs()));
    signal(pid, "KILL");
    wait_until(Duration::from_secs(10), Duration::from_millis(200), || !pid_alive(pid))
}

/// The last `lines` lines of a log file (empty if it has none).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let mut raw = Vec::new();
        let _ = f.read_to_end(&mut raw);
        text = String::from_utf8_lossy(&raw).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last `lines` lines of the latest run in a log (after its last `=== ` separator),
/// without backtrace frames: what says why a process failed must not be pushed out of
/// the excerpt by a `RUST_BACKTRACE` stack.
pub(crate) fn last_run(path: &Path, lines: usize) -> String {
    let text = tail(path, 2_000);
    let run = text.rfind("\n=== ").map_or(text.as_str(), |i| &text[i + 1..]);
    let frame = |l: &&str| {
        let t = l.trim_start();
        t.starts_with("at ") || t.split_once(": ").is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    };
    let kept: Vec<&str> = run.lines().filter(|l| !frame(l)).collect();
    kept[kept.len().saturating_sub(lines)..].join("\n")
}

/// A log file opened for appending (created if missing), for a child's stdout and stderr.
pub(crate) fn append(path: &Path) -> Result<File> {
    OpenOptions::new().create(true).append(true).open(path).map_err(Error::io(format!("open {}", path.display())))
}

/// A file truncated for a child's output.
pub(crate) fn truncate(path: &Path) -> Result<File> {
    File::create(path).map_err(Error::io(format!("create {}", path.display())))
}

/// Two handles on one log file: a child's stdout and stderr.
pub(crate) fn both(file: &File) -> Result<(Stdio, Stdio)> {
    let err = file.try_clone().map_err(Error::io("duplicate a log file handle"))?;
    let out = file.try_clone().map_err(Error::io("duplicate a log file handle"))?;
    Ok((Stdio::from(out), Stdio::from(err)))
}

pub(crate) fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(Error::io(format!("create {}", path.display())))
}

/// Removes a file, ignoring "not there".
pub(crate) fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// The search path of the tools, with the sbin directories where rabbitmq-server and nginx
/// live (a non-login root shell may not have them).
fn search_path() -> String {
    let base = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
    format!("{base}:/usr/local/sbin:/usr/sbin:/sbin")
}

/// The full path of an executable on the search path.
pub(crate) fn tool(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    search_path()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// A command for an external tool, found on the search path (which it inherits), with no
/// stdin: the RabbitMQ CLI tools and nginx must never wait on a terminal.
pub(crate) fn command(name: &str) -> Command {
    let mut cmd = Command::new(tool(name).unwrap_or_else(|| PathBuf::from(name)));
    cmd.env("PATH", search_path()).stdin(Stdio::null());
    cmd
}

/// Runs a tool with its output discarded; true if it exited 0.
pub(crate) fn quietly(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Like [`quietly`], killing the tool if it has not finished `within` (false then).
pub(crate) fn quietly_within(cmd: &mut Command, within: Duration) -> bool {
    let Ok(mut child) = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() else {
        return false;
    };
    let mut status = None;
    wait_until(within, Duration::from_millis(100), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status.is_some_and(|s| s.success())
}

/// Runs a tool with its output appended to `log`; true if it exited 0.
pub(crate) fn logged(cmd: &mut Command, log: &Path) -> Result<bool> {
    let (out, err) = both(&append(log)?)?;
    Ok(cmd.stdout(out).stderr(err).status().is_ok_and(|s| s.success()))
}

/// True if we run as root (apt-get installs need it; nginx then needs a `user` directive).
pub(crate) fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().next()).is_some_and(|uid| uid == "0")
}

/// Installs a Debian package with apt-get (as root), its output in `log`.
pub(crate) fn apt_install(package: &str, log: &Path) -> Result<()> {
    if !is_root() {
        return Err(Error::Failed(format!("{package} is not installed and this is not root: apt-get install {package}")));
    }
    if tool("apt-get").is_none() {
        return Err(Error::Failed(format!("{package} is not installed and there is no apt-get")));
    }
    let file = truncate(log)?;
    let run = |args: &[&str]| -> Result<bool> {
        let (out, err) = both(&file)?;
        Ok(command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(args)
            .stdout(out)
            .stderr(err)
            .status()
            .is_ok_and(|s| s.success()))
    };
    let ok = run(&["update"])?
        && run(&["install", "-y", "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold", package])?;
    if !ok {
        return Err(Error::failed(format!("apt-get install {package} failed"), &[log]));
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS` UTC, for the `=== <time>: ...` separators in the logs.
pub(crate) fn timestamp() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rest / 3600, rest / 60 % 60, rest % 60)
}

/// An exclusive lock on `<dir>/lock`: one mutating command at a time per state dir (tests
/// and people may run them concurrently). Released when dropped. The same `flock(2)` lock
/// the bash scripts took, so an old script and the harness exclude each other too.
pub(crate) struct StateLock(#[allow(dead_code)] File);

impl StateLock {
    pub(crate) fn take(dir: &Path, holder: &str) -> Result<StateLock> {
        mkdir(dir)?;
        let path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Error::io(format!("open {}", path.display())))?;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(StateLock(file)),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::Failed(format!("another {holder} holds {} (waited 300 s)", path.display())))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(format!("lock {}", path.display()))(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_is_alive_and_has_its_command_line() {
        let me = std::process::id();
        assert!(pid_alive(me));
        assert!(cmdline_has(me, "testkit"));
        assert!(!pid_alive(u32::MAX));
    }

    #[test]
    fn a_reaped_child_is_dead_and_a_zombie_too() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        assert!(wait_until(Duration::from_secs(5), Duration::from_millis(10), || { !pid_alive(pid) }), "a zombie counts as dead");
        child.wait().unwrap();
        assert!(!pid_alive(pid));
    }

    #[test]
    fn the_last_run_of_a_log_keeps_the_error_and_drops_backtrace_frames() {
        let dir = std::env::temp_dir().join(format!("testkit-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("node.log");
        let frames = (0..40).map(|i| format!("  {i}: frame\n             at src/x.rs:{i}:1\n")).collect::<String>();
        std::fs::write(
            &log,
            format!("\n=== t1: old run\nold error\n\n=== t2: bin serve\nError: address in use\nStack backtrace:\n{frames}"),
        )
        .unwrap();
        let text = last_run(&log, 25);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text, "=== t2: bin serve\nError: address in use\nStack backtrace:");
    }

    #[test]
    fn timestamp_has_the_shape_of_date_f_t() {
        let t = timestamp();
        assert_eq!(t.len(), 19, "{t}");
        assert_eq!(&t[4..5], "-");
        assert_eq!(&t[10..11], " ");
        assert!(t.starts_with("20"), "{t}");
    }
}
