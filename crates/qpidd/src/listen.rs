//! Binding the AMQP listeners: every `--interface` (default: 0.0.0.0, plus [::] when it can be
//! bound) on one port. The first socket binds the given port (0 = a free one), the others the
//! port it actually got.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context, bail};
use nix::sys::socket::{setsockopt, sockopt::Ipv6V6Only};
use tokio::net::{TcpListener, TcpSocket};

/// Pending connections the kernel queues per listener.
const BACKLOG: u32 = 1024;

/// Binds one listener. IPv6 sockets are IPv6-only so that `[::]` and `0.0.0.0` coexist.
fn bind_addr(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = TcpSocket::new_v6()?;
            setsockopt(&s, Ipv6V6Only, &true).map_err(io::Error::from)?;
            s
        }
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The addresses of an `--interface` value: an IP address (IPv6 optionally in brackets) or a
/// host name.
async fn resolve(interface: &str) -> anyhow::Result<Vec<IpAddr>> {
    let host = interface
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let mut ips = Vec::new();
    for addr in tokio::net::lookup_host((host, 0))
        .await
        .with_context(|| format!("cannot resolve interface '{interface}'"))?
    {
        if !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
    }
    Ok(ips)
}

/// Binds all listeners; returns them with the port they share.
pub async fn bind(interfaces: &[String], port: u16) -> anyhow::Result<(Vec<TcpListener>, u16)> {
    let mut listeners = Vec::new();
    let mut port = port;
    if interfaces.is_empty() {
        let first = bind_addr(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))
            .with_context(|| format!("cannot listen on 0.0.0.0 port {port}"))?;
        port = first.local_addr()?.port();
        listeners.push(first);
        match bind_addr(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)) {
            Ok(l) => listeners.push(l),
            Err(e) => tracing::debug!(target: "Network", "Not listening on [::] port {port}: {e}"),
        }
        return Ok((listeners, port));
    }
    let mut seen = HashSet::new();
    for interface in interfaces {
        let mut bound = false;
        let mut last_error = None;
        for ip in resolve(interface).await? {
            if !seen.insert(ip) {
                bound = true;
                continue;
            }
            match bind_addr(SocketAddr::new(ip, port)) {
                Ok(l) => {
                    port = l.local_addr()?.port();
                    listeners.push(l);
                    bound = true;
                }
                Err(e) => {
                    tracing::warn!(target: "Network", "Cannot listen on {ip} port {port}: {e}");
                    last_error = Some(e);
                }
            }
        }
        if !bound {
            match last_error {
                Some(e) => bail!("cannot listen on interface '{interface}' port {port}: {e}"),
                None => bail!("interface '{interface}' has no address"),
            }
        }
    }
    Ok((listeners, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn all_listeners_share_the_first_port() {
        let interfaces = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let (listeners, port) = bind(&interfaces, 0).await.unwrap();
        assert_ne!(port, 0);
        assert!(!listeners.is_empty());
        for l in &listeners {
            assert_eq!(l.local_addr().unwrap().port(), port);
        }
        // The port is taken now.
        let e = bind(&["127.0.0.1".to_string()], port)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("127.0.0.1"), "{e}");
    }

    #[tokio::test]
    async fn default_binds_all_interfaces() {
        let (listeners, port) = bind(&[], 0).await.unwrap();
        assert_eq!(
            listeners[0].local_addr().unwrap(),
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)
        );
    }
}
