//! Who the client is and how much it may hold: the client address (the socket's peer,
//! or `X-Forwarded-For` from a trusted proxy), the per-address limit on open streams,
//! and the answers to a client over a limit: an event stream that tells the browser
//! to come back later (`200`, `retry:`, `end` with `overloaded`; any other status
//! would make an `EventSource` give up for good), or `503` with `Retry-After`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use ipnet::IpNet;
use rand::Rng;

use crate::config::ServerConfig;
use crate::sse;
use crate::wire::{self, EndReason};

/// The client a request is from: the peer, unless the peer is a trusted proxy, in
/// which case the right-most address of `X-Forwarded-For` that is not itself a
/// trusted proxy (entries further left could be anything the client wrote).
pub(super) fn client_ip(peer: IpAddr, forwarded: Option<&[u8]>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(&canonical(*ip)));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(header) = forwarded.and_then(|f| std::str::from_utf8(f).ok()) else {
        return peer;
    };
    let mut client = peer;
    for entry in header.rsplit(',') {
        let Ok(ip) = entry.trim().parse::<IpAddr>() else {
            // Garbage where an address should be: trust nothing further left.
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    canonical(client)
}

/// An IPv4 address in IPv6 form (`::ffff:a.b.c.d`, as a dual-stack socket reports
/// it) as IPv4, so one client is one key.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Open streams per client address.
#[derive(Debug, Default)]
pub struct PerIp {
    /// A std mutex: held only to bump a count, never across an await.
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    /// Takes one of `ip`'s `limit` slots (0 = no limit), or `None` when it holds them
    /// all.
    pub(super) fn acquire(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<IpSlot> {
        if limit == 0 {
            return Some(IpSlot(None));
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(IpSlot(Some((Arc::clone(self), ip))))
    }

    /// Addresses holding at least one slot.
    pub fn addresses(&self) -> usize {
        self.counts.lock().map_or(0, |c| c.len())
    }
}

/// One open stream counted against its address; released when dropped.
pub(super) struct IpSlot(Option<(Arc<PerIp>, IpAddr)>);

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some((per_ip, ip)) = self.0.take() {
            let mut counts = per_ip.counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = counts.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&ip);
                }
            }
        }
    }
}

/// `overload_retry`, jittered to 50–150% so refused browsers do not return together.
pub(super) fn retry_delay(server: &ServerConfig) -> Duration {
    server
        .overload_retry
        .mul_f64(rand::rng().random_range(0.5..=1.5))
}

/// The body of the overload answer to an event-stream request: when to come back,
/// and why the stream ends (`overloaded`, or `unavailable` for a scoped stream that
/// cannot take clients yet).
pub(super) fn overload_events(server: &ServerConfig, reason: EndReason) -> [Bytes; 2] {
    [sse::retry(retry_delay(server).as_millis()), reason.frame()]
}

/// The whole overload answer to an event-stream request, for a raw socket:
/// `200` with the stream headers, then [`overload_events`]; the connection closes
/// after it.
pub(super) fn overload_response(
    server: &ServerConfig,
    cors: &[(&str, String)],
    reason: EndReason,
) -> Bytes {
    let mut out = BytesMut::with_capacity(256);
    out.put_slice(b"HTTP/1.1 200 OK\r\nconnection: close\r\n");
    for (name, value) in wire::STREAM_HEADERS
        .iter()
        .map(|(n, v)| (*n, *v))
        .chain(cors.iter().map(|(n, v)| (*n, v.as_str())))
    {
        out.put_slice(name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    for frame in overload_events(server, reason) {
        out.put_slice(&frame);
    }
    out.freeze()
}

/// The `503` for a request that is not an event stream.
pub(super) fn unavailable_response(
    server: &ServerConfig,
    cors: &[(&str, String)],
    reason: EndReason,
) -> Bytes {
    let secs = retry_delay(server).as_secs().max(1);
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {secs}\r\nconnection: close\r\n"
    );
    for (name, value) in cors {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    let body = format!("{{\"error\":\"{}\"}}\n", reason.as_str());
    out.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().expect("net")).collect()
    }

    #[test]
    fn the_client_is_the_peer_unless_the_peer_is_a_trusted_proxy() {
        let peer: IpAddr = "10.0.0.5".parse().expect("ip");
        let xff = Some(&b"203.0.113.9"[..]);
        assert_eq!(client_ip(peer, xff, &[]), peer, "no proxy trusted");
        assert_eq!(
            client_ip(peer, xff, &nets(&["10.0.0.0/8"])),
            "203.0.113.9".parse::<IpAddr>().expect("ip")
        );
        // A chain through two trusted proxies; what the client itself wrote (the
        // left-most entry) is not believed past the first untrusted address.
        let chain = Some(&b"1.1.1.1, 198.51.100.7, 10.0.0.9"[..]);
        assert_eq!(
            client_ip(peer, chain, &nets(&["10.0.0.0/8"])),
            "198.51.100.7".parse::<IpAddr>().expect("ip")
        );
        // Garbage stops the walk at the last good address.
        let junk = Some(&b"evil, 10.0.0.9"[..]);
        assert_eq!(
            client_ip(peer, junk, &nets(&["10.0.0.0/8"])),
            "10.0.0.9".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(client_ip(peer, None, &nets(&["10.0.0.0/8"])), peer);
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().expect("ip");
        assert_eq!(
            client_ip(mapped, xff, &nets(&["10.0.0.0/8"])),
            "203.0.113.9".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn per_address_slots_are_counted_and_given_back() {
        let per_ip = Arc::new(PerIp::default());
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let one = per_ip.acquire(a, 2).expect("first");
        let two = per_ip.acquire(a, 2).expect("second");
        assert!(per_ip.acquire(a, 2).is_none(), "third over the limit");
        assert!(
            per_ip.acquire(b, 2).is_some(),
            "another address is separate"
        );
        drop(one);
        let three = per_ip.acquire(a, 2).expect("a slot came back");
        drop((two, three));
        assert_eq!(per_ip.addresses(), 0, "nothing left behind");
        assert!(per_ip.acquire(a, 0).is_some(), "0 is no limit");
        assert_eq!(per_ip.addresses(), 0, "no limit counts nothing");
    }
}
