//! Client side of a role talking to another: a host name is resolved for every new stream
//! and streams are spread round-robin over its addresses (a Kubernetes headless Service
//! lists one per replica), or sent by affinity (a key goes to the same address while it
//! stays and is not busy); one HTTP/2 channel per address is shared by all streams. An
//! `https://` address is called over TLS, trusting the certificate authorities of
//! [`ClientTls`] and checking that the certificate names the host.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

use crate::tls::ClientTls;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings find a peer that vanished without closing its connections.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A key's address is busy, and the least loaded address takes the stream instead, when it
/// has this many more streams open (from this process) than the least loaded one.
pub const BUSY_MARGIN: usize = 4;

/// Channels to the replicas of one or more services.
#[derive(Debug, Default)]
pub struct Balancer {
    /// Per service address: a channel for each address it resolved to last time (addresses
    /// that no longer resolve, such as replaced pods, are forgotten).
    channels: Mutex<HashMap<ServiceAddress, HashMap<SocketAddr, Channel>>>,
    /// What `https://` addresses are checked against.
    tls: Option<Arc<ClientTls>>,
    next: AtomicUsize,
    /// Streams open per address, of those picked by affinity.
    open: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
}

/// A stream picked by affinity, counted open at its address until this is dropped.
#[derive(Debug)]
pub struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// Calls `https://` addresses trusting `tls` (without it they cannot be called).
    pub fn new(tls: Option<Arc<ClientTls>>) -> Self {
        Self {
            tls,
            ..Self::default()
        }
    }

    /// A channel to one of the addresses of `services` (round-robin over all of them but
    /// those in `avoid`, unless that leaves none), and that address.
    pub async fn pick(
        &self,
        services: &[ServiceAddress],
        avoid: &[SocketAddr],
    ) -> Result<(SocketAddr, Channel), String> {
        let resolved = resolve_all(services).await?;
        let addrs = usable(&resolved, avoid);
        let addr = addrs[self.next.fetch_add(1, Ordering::Relaxed) % addrs.len()];
        Ok((addr, self.channel_among(&resolved, addr)?))
    }

    /// A channel to the address of `services` that `key` goes to (see [`by_affinity`]) among
    /// those not in `avoid` (unless that leaves none), that address, and the stream's count
    /// there.
    pub async fn pick_by_affinity(
        &self,
        services: &[ServiceAddress],
        key: u64,
        avoid: &[SocketAddr],
    ) -> Result<(SocketAddr, Channel, Open), String> {
        let resolved = resolve_all(services).await?;
        let addrs = usable(&resolved, avoid);
        let open = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            // Addresses that went (replaced pods) are forgotten once their streams ended.
            open.retain(|addr, n| addrs.contains(addr) || n.load(Ordering::Relaxed) > 0);
            let load = |addr: &SocketAddr| open.get(addr).map_or(0, |n| n.load(Ordering::Relaxed));
            let addr = by_affinity(&addrs, key, load);
            let count = open.entry(addr).or_default().clone();
            count.fetch_add(1, Ordering::Relaxed);
            (addr, Open(count))
        };
        let (addr, open) = open;
        Ok((addr, self.channel_among(&resolved, addr)?, open))
    }

    /// A channel to every address `service` resolves to now, with that address.
    pub async fn all(
        &self,
        service: &ServiceAddress,
    ) -> Result<Vec<(SocketAddr, Channel)>, String> {
        let addrs = resolve(&service.host, service.port).await?;
        addrs
            .iter()
            .map(|&addr| Ok((addr, self.channel(service, &addrs, addr)?)))
            .collect()
    }

    /// The channel to `addr`, one of the `resolved` addresses.
    fn channel_among(
        &self,
        resolved: &[(SocketAddr, &ServiceAddress)],
        addr: SocketAddr,
    ) -> Result<Channel, String> {
        let service = resolved
            .iter()
            .find(|(known, _)| *known == addr)
            .map(|(_, service)| *service)
            .ok_or_else(|| format!("{addr} is not an address of the services"))?;
        let addrs: Vec<SocketAddr> = resolved
            .iter()
            .filter(|(_, s)| *s == service)
            .map(|(a, _)| *a)
            .collect();
        self.channel(service, &addrs, addr)
    }

    /// The channel to `addr`, one of `addrs` (the addresses `service` resolves to now).
    fn channel(
        &self,
        service: &ServiceAddress,
        addrs: &[SocketAddr],
        addr: SocketAddr,
    ) -> Result<Channel, String> {
        let mut all = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let channels = all.entry(service.clone()).or_default();
        channels.retain(|known, _| addrs.contains(known));
        if let Some(channel) = channels.get(&addr) {
            return Ok(channel.clone());
        }
        let channel = endpoint(service, addr, self.tls.as_deref())?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(addr, channel.clone());
        Ok(channel)
    }
}

/// An endpoint for `addr`, one of the addresses of `service`: over TLS, checking the
/// certificate against `tls` for the service's host name, when the address is `https://`.
fn endpoint(
    service: &ServiceAddress,
    addr: SocketAddr,
    tls: Option<&ClientTls>,
) -> Result<Endpoint, String> {
    if !service.tls {
        return Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string());
    }
    let tls = tls.ok_or_else(|| {
        format!("{service} is TLS, and no certificate authority to trust was given (--tls-ca)")
    })?;
    Endpoint::from_shared(format!("https://{addr}"))
        .and_then(|endpoint| endpoint.tls_config(tls.tonic(&service.host)))
        .map_err(|e| crate::server::error_chain(&e))
}

/// The `resolved` addresses not in `avoid`, or all of them if none is left.
fn usable(resolved: &[(SocketAddr, &ServiceAddress)], avoid: &[SocketAddr]) -> Vec<SocketAddr> {
    let all = resolved.iter().map(|(addr, _)| *addr);
    let rest: Vec<SocketAddr> = all.clone().filter(|addr| !avoid.contains(addr)).collect();
    if rest.is_empty() {
        all.collect()
    } else {
        rest
    }
}

/// The addresses every one of `services` resolves to now, each with its service, sorted (an
/// address listed twice counts once); at least one, else why none.
async fn resolve_all(
    services: &[ServiceAddress],
) -> Result<Vec<(SocketAddr, &ServiceAddress)>, String> {
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for service in services {
        match resolve(&service.host, service.port).await {
            Ok(addrs) => all.extend(addrs.into_iter().map(|addr| (addr, service))),
            Err(error) => errors.push(error),
        }
    }
    if all.is_empty() {
        errors.push("no service to call".into());
        return Err(errors.join("; "));
    }
    all.sort_by_key(|(addr, _)| *addr);
    all.dedup_by_key(|(addr, _)| *addr);
    Ok(all)
}

/// The addresses `host` resolves to now, sorted, at least one.
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    Ok(addrs)
}

/// Where a stream with `key` goes among `addrs` (not empty), given each one's open streams:
/// the address that rendezvous hashing ranks first for the key, so that a key stays where it
/// went while that address stays (when one goes, only its keys move; one that comes takes
/// its share), unless it has [`BUSY_MARGIN`] more streams open than the least loaded one,
/// which then takes the stream.
pub fn by_affinity(
    addrs: &[SocketAddr],
    key: u64,
    load: impl Fn(&SocketAddr) -> usize,
) -> SocketAddr {
    let preferred = addrs
        .iter()
        .max_by_key(|addr| mix(key ^ mix(fnv1a(addr.to_string().as_bytes()))))
        .copied()
        .unwrap_or(addrs[0]);
    let least = addrs
        .iter()
        .min_by_key(|addr| load(addr))
        .copied()
        .unwrap_or(preferred);
    if load(&preferred) >= load(&least) + BUSY_MARGIN {
        least
    } else {
        preferred
    }
}

/// FNV-1a: a hash that is the same in every process and build.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64's finalizer: spreads a hash's bits.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Where a service listens: `http://HOST:PORT`, or `https://HOST:PORT` over TLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAddress {
    pub host: String,
    pub port: u16,
    /// Called over TLS (`https://`).
    pub tls: bool,
}

/// An address that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address `{value}`: {reason} (expected http://HOST:PORT or https://HOST:PORT)")]
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
        let (tls, rest) = match (
            value.strip_prefix("http://"),
            value.strip_prefix("https://"),
        ) {
            (Some(rest), _) => (false, rest),
            (None, Some(rest)) => (true, rest),
            (None, None) => return Err(error("it must start with http:// or https://")),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| error("no port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(error("no host"));
        }
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Self {
                host: host.to_string(),
                port,
                tls,
            }),
            _ => Err(error("the port is not a number in 1..=65535")),
        }
    }
}

impl std::fmt::Display for ServiceAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Polls the gRPC health of the server at `addr` until it says SERVING; false if it has not
/// within `timeout`.
pub async fn wait_until_serving(addr: SocketAddr, timeout: Duration) -> bool {
    wait_until_serving_over(addr, None, timeout).await
}

/// [`wait_until_serving`], over TLS trusting `tls` when given.
pub async fn wait_until_serving_over(
    addr: SocketAddr,
    tls: Option<&ClientTls>,
    timeout: Duration,
) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let host = addr.ip().to_string();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let attempt = left.min(Duration::from_secs(2));
        if check_serving(&host, addr.port(), "", tls, attempt)
            .await
            .is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100).min(left)).await;
    }
}

/// Asks the gRPC health of `service` ("" for the whole server) at every address `host`
/// resolves to, over TLS trusting `tls` when given; `Ok` if one says SERVING within
/// `timeout`, else why not.
pub async fn check_serving(
    host: &str,
    port: u16,
    service: &str,
    tls: Option<&ClientTls>,
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
        let server = ServiceAddress {
            host: host.to_string(),
            port,
            tls: tls.is_some(),
        };
        let mut reasons = Vec::new();
        for addr in addrs {
            let reason = match endpoint(&server, addr, tls) {
                Err(error) => error,
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
    fn a_key_stays_where_it_went_unless_that_address_goes_or_is_busy() {
        let addrs: Vec<SocketAddr> = (1..=4)
            .map(|i| format!("10.0.0.{i}:50051").parse().unwrap())
            .collect();
        let idle = |_: &SocketAddr| 0;
        let keys: Vec<u64> = (0..400)
            .map(|k| fnv1a(&[k as u8, (k >> 8) as u8]))
            .collect();
        let chosen: Vec<SocketAddr> = keys.iter().map(|&k| by_affinity(&addrs, k, idle)).collect();
        // Spread over every address, and the same every time.
        for addr in &addrs {
            let share = chosen.iter().filter(|c| *c == addr).count();
            assert!((60..=140).contains(&share), "{addr}: {share} of 400");
        }
        assert_eq!(chosen[7], by_affinity(&addrs, keys[7], idle));
        // One address goes: only its keys move.
        let gone = addrs[2];
        let rest: Vec<SocketAddr> = addrs.iter().copied().filter(|a| *a != gone).collect();
        for (&key, &before) in keys.iter().zip(&chosen) {
            let after = by_affinity(&rest, key, idle);
            if before != gone {
                assert_eq!(after, before);
            }
        }
        // A busy address gives its keys to the least loaded one.
        let key = keys[0];
        let home = chosen[0];
        let other = *addrs.iter().find(|a| **a != home).unwrap();
        let load = |n: usize| {
            move |a: &SocketAddr| {
                if *a == home {
                    n
                } else {
                    usize::from(*a != other) * n
                }
            }
        };
        assert_eq!(by_affinity(&addrs, key, load(BUSY_MARGIN - 1)), home);
        assert_eq!(by_affinity(&addrs, key, load(BUSY_MARGIN)), other);
    }

    #[test]
    fn an_https_address_needs_a_certificate_authority() {
        let service: ServiceAddress = "https://verifier:50052".parse().unwrap();
        let error = endpoint(&service, "127.0.0.1:50052".parse().unwrap(), None).unwrap_err();
        assert!(error.contains("--tls-ca"), "{error}");
        let plain: ServiceAddress = "http://verifier:50052".parse().unwrap();
        assert!(endpoint(&plain, "127.0.0.1:50052".parse().unwrap(), None).is_ok());
    }

    #[test]
    fn addresses_parse_and_bad_ones_say_why() {
        let address: ServiceAddress = "http://drafters.sibyl.svc:50061".parse().unwrap();
        assert_eq!(
            (address.host.as_str(), address.port),
            ("drafters.sibyl.svc", 50061)
        );
        assert!(!address.tls);
        let v6: ServiceAddress = "http://[::1]:7/".parse().unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 7));
        assert_eq!(v6.to_string(), "http://[::1]:7");
        let tls: ServiceAddress = "https://verifier.sibyl.svc:50052".parse().unwrap();
        assert!(tls.tls);
        assert_eq!(tls.to_string(), "https://verifier.sibyl.svc:50052");
        for bad in [
            "x:1",
            "http://x",
            "http://x:0",
            "http://x:99999",
            "http://:1",
            "https://x",
            "grpc://x:1",
        ] {
            let error = bad.parse::<ServiceAddress>().unwrap_err();
            assert!(error.to_string().contains("expected http://"), "{error}");
        }
    }
}
