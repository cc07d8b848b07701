//! Loopback probes: is a port open, what does a URL answer.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// True if a TCP connection to 127.0.0.1:`port` is accepted within 2 s.
pub(crate) fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2)).is_ok()
}

/// The HTTP status of `GET url`, 0 if nothing answered within `timeout`.
pub(crate) fn http_status(url: &str, timeout: Duration) -> u16 {
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    match agent.get(url).call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(ureq::Error::Transport(_)) => 0,
    }
}
