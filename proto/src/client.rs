//! Client side of a role talking to another: a host name is resolved for every new stream
//! and streams are spread round-robin over its addresses (a Kubernetes headless Service
//! lists one per replica); one HTTP/2 channel per address is shared by all streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings find a peer that vanished without closing its connections.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Channels to the replicas of one or more services.
#[derive(Debug, Default)]
pub struct Balancer {
    /// Per `(host, port)`: a channel for each address it resolved to last time (addresses
    /// that no longer resolve, such as replaced pods, are forgotten).
    channels: Mutex<HashMap<(String, u16), HashMap<SocketAddr, Channel>>>,
    next: AtomicUsize,
}

impl Balancer {
    /// A channel to one of the addresses of `host`, and that address.
    pub async fn pick(&self, host: &str, port: u16) -> Result<(SocketAddr, Channel), String> {
        let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(format!("{host} resolves to no address"));
        }
        let addr = addrs[self.next.fetch_add(1, Ordering::Relaxed) % addrs.len()];
        let mut all = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let channels = all.entry((host.to_string(), port)).or_default();
        channels.retain(|known, _| addrs.contains(known));
        if let Some(channel) = channels.get(&addr) {
            return Ok((addr, channel.clone()));
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(addr, channel.clone());
        Ok((addr, channel))
    }
}

/// Where a service listens: `http://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAddress {
    pub host: String,
    pub port: u16,
}

/// An address that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address `{value}`: {reason} (expected http://HOST:PORT)")]
pub struct AddressError {
    value: String,
    reason: &'static str,
}

impl std::str::FromStr for ServiceAddress {
    type Err = AddressError;

    fn from_str(value: &str) -> Result<Self, AddressError> {
        let error = |reason| AddressError {
            value: value.to_string(),
            reason,
        };
        let rest = value
            .strip_prefix("http://")
            .ok_or_else(|| error("it must start with http://"))?
            .trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| error("no port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(error("no host"));
        }
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Self {
                host: host.to_string(),
                port,
            }),
            _ => Err(error("the port is not a number in 1..=65535")),
        }
    }
}

impl std::fmt::Display for ServiceAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{}:{}", self.host, self.port)
        }
    }
}

/// Polls the gRPC health of the server at `addr` until it says SERVING; false if it has not
/// within `timeout`.
pub async fn wait_until_serving(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let host = addr.ip().to_string();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let attempt = left.min(Duration::from_secs(2));
        if check_serving(&host, addr.port(), "", attempt).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100).min(left)).await;
    }
}

/// Asks the gRPC health of `service` ("" for the whole server) at every address `host`
/// resolves to; `Ok` if one says SERVING within `timeout`, else why not.
pub async fn check_serving(
    host: &str,
    port: u16,
    service: &str,
    timeout: Duration,
) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let check = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("{host} resolves to no address"));
        }
        let mut reasons = Vec::new();
        for addr in addrs {
            let reason = match Endpoint::from_shared(format!("http://{addr}")) {
                Err(error) => error.to_string(),
                Ok(endpoint) => match endpoint.connect_timeout(CONNECT_TIMEOUT).connect().await {
                    Err(error) => format!("cannot connect: {}", crate::server::error_chain(&error)),
                    Ok(channel) => {
                        let request = HealthCheckRequest {
                            service: service.to_string(),
                        };
                        match HealthClient::new(channel).check(request).await {
                            Ok(response)
                                if response.get_ref().status() == ServingStatus::Serving =>
                            {
                                return Ok(())
                            }
                            Ok(response) => format!("{:?}", response.get_ref().status()),
                            Err(status) => status.message().to_string(),
                        }
                    }
                },
            };
            reasons.push(format!("{addr}: {reason}"));
        }
        Err(reasons.join("; "))
    };
    tokio::time::timeout(timeout, check)
        .await
        .unwrap_or_else(|_| Err(format!("{host}:{port} did not answer within {timeout:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_bad_ones_say_why() {
        let address: ServiceAddress = "http://drafters.sibyl.svc:50061".parse().unwrap();
        assert_eq!(
            (address.host.as_str(), address.port),
            ("drafters.sibyl.svc", 50061)
        );
        let v6: ServiceAddress = "http://[::1]:7/".parse().unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 7));
        assert_eq!(v6.to_string(), "http://[::1]:7");
        for bad in [
            "x:1",
            "http://x",
            "http://x:0",
            "http://x:99999",
            "http://:1",
            "https://x:1",
        ] {
            let error = bad.parse::<ServiceAddress>().unwrap_err();
            assert!(error.to_string().contains("expected http://"), "{error}");
        }
    }
}
