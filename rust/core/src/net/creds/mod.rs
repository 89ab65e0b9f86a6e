//! Credential substitution: the sandbox holds placeholders, the egress proxy puts the real
//! values into the requests bound for each credential's hosts.
//!
//! With credentials in the spec every HTTP request leaving the sandbox is read whole by the
//! supervisor: absolute-URI requests to the proxy, CONNECT tunnels and direct connections
//! (TLS is terminated with the sandbox's own CA, see `mitm.rs`). For each request:
//! - a credential whose hosts match the request's host (and whose `methods`, when set, list its
//!   method) has its placeholder replaced by the value in the request headers (only `header`
//!   when set), and in the URL query and the body when opted in (`Content-Length` follows);
//! - `Authorization: Basic` credentials are decoded, substituted and re-encoded (git and pip
//!   put a token in the password of basic auth);
//! - a placeholder left anywhere in the request toward a host its credential is not bound to
//!   is a leak, also when encoded: every form the output redactor knows (hex, base64 and
//!   base64url at each byte alignment, base32, percent-, JSON- and UTF-16 escapes; see
//!   `redact::encoded_forms`) of the placeholder in upper, lower or its own case, matched
//!   ignoring ASCII case, in the request as sent and with its `%XX` escapes decoded (up to
//!   [`DECODE_ROUNDS`] times, so any mix of escaped and plain characters is seen). The request
//!   is never forwarded, the refusal is reported as a [`Violation::Credential`], and `on_leak`
//!   decides the rest (403, kill the sandbox, or close the connection without an answer);
//! - a placeholder toward its own host with a method it is not allowed is forwarded as the
//!   placeholder (the host sees no secret).
//!
//! Responses are relayed as framed (`Content-Length`, chunked, or up to the upstream's close).
//! Plain HTTP requests go upstream on a connection of their own with `Connection: close`.
//! Intercepted HTTPS requests are kept alive upstream: after a framed response the TLS
//! connection goes to the sandbox's own pool ([`Broker`] is per sandbox, so a connection is
//! never shared between sandboxes), keyed by host (which is also the SNI) and port, at most
//! [`POOL_MAX`] idle for at most [`POOL_IDLE`]; the next request to that host from any of the
//! sandbox's connections reuses it instead of a new TLS handshake (the policy is checked again
//! as for a new connection). A pooled connection the server closed meanwhile is retried once
//! on a new one.
//! Traffic that is neither TLS nor HTTP is relayed, and cut when a placeholder goes by toward
//! a host its credential is not bound to.

mod broker;
mod http;
mod pool;
mod relay;
mod serve;

use super::Shared;
use crate::report::Violation;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub use broker::Broker;
pub use http::MAX_BODY;
pub(crate) use serve::{serve_proxy, serve_tunnel};

/// How many times `%XX` escapes are decoded before a request is scanned again (a placeholder
/// escaped twice is still found).
const DECODE_ROUNDS: usize = 3;
/// At most this many idle upstream TLS connections are kept per sandbox.
pub const POOL_MAX: usize = 8;
/// An idle upstream connection is closed after this long unused.
pub const POOL_IDLE: Duration = Duration::from_secs(20);

impl Shared {
    /// Records a placeholder refused toward `host:port` (once per credential, host and port).
    pub(crate) fn refuse_credential(&self, name: &str, host: &str, port: u16, method: &str) {
        let reason = if method.is_empty() {
            format!("placeholder of {name} sent to a host it is not bound to")
        } else {
            format!("placeholder of {name} in a {method} request to a host it is not bound to")
        };
        self.record(
            (format!("credential:{name}:{host}"), port, String::new()),
            Violation::Credential {
                name: name.to_string(),
                host: host.to_string(),
                port,
                reason,
            },
        );
    }

    /// Kills the sandbox (`on_leak = kill`), once.
    pub(crate) fn kill_sandbox(&self) {
        self.credential_kill.store(true, Ordering::SeqCst);
        if let Some(fd) = super::lock(&self.kill_target).as_ref() {
            // SAFETY: pidfd_send_signal on a pidfd we own, no memory passed.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests;
