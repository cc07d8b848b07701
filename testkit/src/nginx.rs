//! The cluster's nginx, standing in for the ALB of `deploy/aws/liftlog.yaml`.
//!
//! Its config is `deploy/nginx/liftlog-cluster.conf` (compiled in, so the config and the
//! code that renders it cannot come from different commits) with the placeholders filled
//! in: the state dir, the listen address and one `server` line per write and read node.
//! nginx runs as `nginx -p <dir> -c <dir>/nginx.conf`: its pid, logs and temp files are all
//! under the cluster's state dir, nothing in /etc, /var/log or /run is touched.

use crate::net::http_status;
use crate::process::{self, log, warn};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

const TAG: &str = "cluster";

/// The template, as committed in `deploy/nginx/`.
pub const TEMPLATE: &str = include_str!("../../deploy/nginx/liftlog-cluster.conf");

/// The temp dirs the config names; nginx refuses to start without them.
const TEMP_DIRS: [&str; 5] = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"];

/// The template with its placeholders filled in. `user` is the `user <user> <group>;`
/// directive (empty unless started as root, so that the workers can write the temp dirs).
/// Fails if a placeholder is left that this renderer does not know.
pub fn render(template: &str, user: &str, nginx_dir: &Path, listen: &str, write_ports: &[u16], read_ports: &[u16]) -> Result<String> {
    // One failure takes a node out for 2 s; then nginx tries it again.
    let servers = |ports: &[u16]| {
        ports.iter().map(|p| format!("        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;")).collect::<Vec<_>>().join("\n")
    };
    let text = template
        .replace("@USER_DIRECTIVE@", user)
        .replace("@NGINX_DIR@", &nginx_dir.display().to_string())
        .replace("@LISTEN@", listen)
        .replace("@WRITE_SERVERS@", &servers(write_ports))
        .replace("@READ_SERVERS@", &servers(read_ports));
    if let Some(left) = placeholder(&text) {
        return Err(Error::Failed(format!("nginx: unrendered placeholder {left} in deploy/nginx/liftlog-cluster.conf")));
    }
    Ok(format!("{}\n", text.trim_end_matches('\n')))
}

/// The first `@NAME@` (capitals and underscores) in `text`, if any.
fn placeholder(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    bytes.iter().enumerate().filter(|(_, b)| **b == b'@').find_map(|(start, _)| {
        let len = bytes[start + 1..].iter().take_while(|b| b.is_ascii_uppercase() || **b == b'_').count();
        (bytes.get(start + 1 + len) == Some(&b'@')).then(|| &text[start..start + len + 2])
    })
}

/// The cluster's nginx: its state dir and the port it listens on.
#[derive(Debug, Clone)]
pub struct Nginx {
    pub dir: PathBuf,
    pub port: u16,
    pub timeout: Duration,
}

impl Nginx {
    /// Installs nginx with apt-get when missing (root only). If the package started the
    /// system nginx, it is stopped again: we caused it, and the cluster runs its own.
    pub fn install(log_dir: &Path) -> Result<()> {
        if process::tool("nginx").is_some() {
            return Ok(());
        }
        process::mkdir(log_dir)?;
        let system_pid = Path::new("/run/nginx.pid");
        let before = system_pid.metadata().is_ok_and(|m| m.len() > 0);
        let apt_log = log_dir.join("apt-install.log");
        log(TAG, format!("nginx: installing with apt-get (log: {})", apt_log.display()));
        process::apt_install("nginx", &apt_log).map_err(|e| Error::Failed(format!("nginx: {e}")))?;
        if process::tool("nginx").is_none() {
            return Err(Error::Failed("nginx: still not found after apt-get install".into()));
        }
        if !before && system_pid.metadata().is_ok_and(|m| m.len() > 0) {
            log(TAG, "nginx: the package started the system nginx; stopping it (nginx -s quit)");
            process::quietly(process::command("nginx").args(["-s", "quit"]));
        }
        Ok(())
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("nginx.conf")
    }

    fn error_log(&self) -> PathBuf {
        self.dir.join("error.log")
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("nginx.pid")
    }

    /// `nginx -p DIR -c DIR/nginx.conf -e DIR/error.log` and the extra arguments.
    fn nginx(&self, extra: &[&str]) -> std::process::Command {
        let mut cmd = process::command("nginx");
        cmd.arg("-p").arg(&self.dir).arg("-c").arg(self.conf()).arg("-e").arg(self.error_log()).args(extra);
        cmd
    }

    /// The master's pid, if this cluster's nginx runs.
    pub fn pid(&self) -> Option<u32> {
        let pid = process::read_pid(&self.pid_file())?;
        (process::pid_alive(pid) && process::cmdline_has(pid, "nginx")).then_some(pid)
    }

    /// The status of `GET /nginx-health` (0: no answer).
    fn health(&self) -> u16 {
        http_status(&format!("http://127.0.0.1:{}/nginx-health", self.port), Duration::from_secs(2))
    }

    /// Writes the rendered config (and the temp dirs it names).
    fn write_config(&self, write_ports: &[u16], read_ports: &[u16]) -> Result<()> {
        for d in TEMP_DIRS {
            process::mkdir(&self.dir.join("tmp").join(d))?;
        }
        let user = if process::is_root() { format!("user {} {};", id("-un")?, id("-gn")?) } else { String::new() };
        let text = render(TEMPLATE, &user, &self.dir, &format!("127.0.0.1:{}", self.port), write_ports, read_ports)?;
        std::fs::write(self.conf(), text).map_err(Error::io(format!("write {}", self.conf().display())))
    }

    /// Renders the config and starts nginx, or reloads it if it runs already; waits until
    /// `/nginx-health` answers.
    pub fn start(&self, write_ports: &[u16], read_ports: &[u16]) -> Result<()> {
        self.write_config(write_ports, read_ports)?;
        if let Some(pid) = self.pid() {
            log(TAG, format!("nginx: already running (pid {pid}); reloading the rendered config"));
            if !process::logged(&mut self.nginx(&["-s", "reload"]), &self.dir.join("nginx.out"))? {
                return Err(Error::failed("nginx: reload failed", &[&self.dir.join("nginx.out"), &self.error_log()]));
            }
            return Ok(());
        }
        if self.health() != 0 {
            return Err(Error::Failed(format!("nginx: port {} is taken by a process this cluster did not start", self.port)));
        }
        let out = self.dir.join("nginx.out");
        if !process::logged(&mut self.nginx(&["-t", "-q"]), &out)? {
            return Err(Error::failed(format!("nginx: the rendered config {} does not pass nginx -t", self.conf().display()), &[&out]));
        }
        process::remove(&self.pid_file());
        // nginx daemonizes: the command returns once the master runs in the background.
        if !process::logged(&mut self.nginx(&[]), &out)? {
            return Err(Error::failed("nginx: failed to start", &[&out, &self.error_log()]));
        }
        if !process::wait_until(self.timeout, Duration::from_millis(200), || self.health() == 200) {
            return Err(Error::failed(format!("nginx: no answer on 127.0.0.1:{}", self.port), &[&self.error_log()]));
        }
        let pid = self.pid().map_or_else(|| "?".into(), |p| p.to_string());
        log(TAG, format!("nginx: ready on http://127.0.0.1:{} (pid {pid})", self.port));
        Ok(())
    }

    /// SIGQUIT (graceful: open requests finish), SIGTERM after 20 s.
    pub fn stop(&self) {
        let Some(pid) = self.pid() else {
            log(TAG, "nginx: not running");
            return;
        };
        log(TAG, format!("nginx: quit (pid {pid})"));
        process::signal(pid, "QUIT");
        if !process::wait_until(Duration::from_secs(20), Duration::from_millis(200), || !process::pid_alive(pid)) {
            warn(TAG, format!("nginx: pid {pid} still alive; SIGTERM"));
            process::signal(pid, "TERM");
            if !process::wait_until(Duration::from_secs(10), Duration::from_millis(200), || !process::pid_alive(pid)) {
                warn(TAG, format!("nginx: pid {pid} does not die"));
            }
        }
        process::remove(&self.pid_file());
    }
}

/// `id -un` / `id -gn`: our user and group names.
fn id(flag: &str) -> Result<String> {
    let out = process::command("id").arg(flag).output().map_err(Error::io(format!("run id {flag}")))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_renders_without_placeholders_left() {
        let text = render(TEMPLATE, "", Path::new("/tmp/n"), "127.0.0.1:9080", &[9081, 9082], &[9101]).unwrap();
        assert!(placeholder(&text).is_none());
        assert!(text.contains("listen 127.0.0.1:9080 backlog=4096;"), "{text}");
        assert!(text.contains("pid /tmp/n/nginx.pid;"));
        let write = "    upstream liftlog_write {\n        least_conn;\n        server 127.0.0.1:9081 max_fails=1 fail_timeout=2s;\n        server 127.0.0.1:9082 max_fails=1 fail_timeout=2s;\n";
        assert!(text.contains(write), "{text}");
        assert!(text.contains("least_conn;\n        server 127.0.0.1:9101 max_fails=1 fail_timeout=2s;\n        keepalive 64;"));
        assert!(text.ends_with("}\n") && !text.ends_with("\n\n"));
    }

    #[test]
    fn an_unknown_placeholder_is_refused_and_named_locations_are_not_placeholders() {
        assert_eq!(placeholder("location @write {"), None);
        assert_eq!(placeholder("a @NEW_THING@ b"), Some("@NEW_THING@"));
        let err = render("x @NEW@", "", Path::new("/n"), "l", &[], &[]).unwrap_err();
        assert!(err.to_string().contains("@NEW@"), "{err}");
    }
}
