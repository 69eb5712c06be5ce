//! Who a request comes from, for the rate limits without authentication:
//! the peer's address, or behind a trusted proxy (`--trusted-proxies`) the
//! address that proxy reports (`Forwarded: for=`, else `X-Forwarded-For`);
//! and the bucket that address counts against (an IPv6 client's /64, which
//! one host can rotate through freely, as one).
//!
//! Pure functions over the request's headers; the headers of a peer that is
//! not a trusted proxy are never read (anyone can send them).

use std::net::{IpAddr, Ipv6Addr};

/// An address block: `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let bad = || format!("{text:?} is not an address or address/prefix");
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr {
            addr: canonical(addr),
            prefix,
        })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), self.prefix, 32)
                    == masked(u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), self.prefix, 128)
                    == masked(u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn masked(bits: u128, prefix: u8, width: u32) -> u128 {
    let keep = u32::from(prefix).min(width);
    if keep == 0 { 0 } else { bits >> (width - keep) }
}

/// An IPv4 client on a dual-stack socket (`::ffff:a.b.c.d`) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: `peer`, unless `peer` is a trusted proxy; then
/// the hops it reports are walked from the nearest (the right) while they
/// are trusted proxies too, and the first that is not is the client. A hop
/// that is not an address (`unknown`, an obfuscated identifier, garbage)
/// stops the walk at the last trusted one: it cannot be attributed.
pub fn client_address(
    peer: IpAddr,
    forwarded: &[&[u8]],
    x_forwarded_for: &[&[u8]],
    trusted: &[Cidr],
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return canonical(peer);
    }
    let hops: Vec<Option<IpAddr>> = if !forwarded.is_empty() {
        forwarded.iter().flat_map(|v| forwarded_for(v)).collect()
    } else {
        x_forwarded_for
            .iter()
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|hop| parse_hop(hop.trim_ascii()))
            .collect()
    };
    let mut client = canonical(peer);
    for hop in hops.into_iter().rev() {
        match hop {
            Some(ip) => {
                client = canonical(ip);
                if !is_trusted(client) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

/// The `for=` of each element of a `Forwarded` field (RFC 7239), in order.
fn forwarded_for(value: &[u8]) -> Vec<Option<IpAddr>> {
    value
        .split(|&b| b == b',')
        .map(|element| {
            element
                .split(|&b| b == b';')
                .filter_map(|pair| {
                    let pair = pair.trim_ascii();
                    let (name, value) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
                    name.eq_ignore_ascii_case(b"for").then(|| &value[1..])
                })
                .next()
                .and_then(|v| {
                    let v = v.trim_ascii();
                    let v = v.strip_prefix(b"\"").unwrap_or(v);
                    parse_hop(v.strip_suffix(b"\"").unwrap_or(v))
                })
        })
        .collect()
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:80`.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(hop).ok()?;
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest
            .split_once(']')?
            .0
            .parse::<Ipv6Addr>()
            .ok()
            .map(IpAddr::V6);
    }
    let (host, port) = text.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The rate-limit bucket of an address: `ip:` and the IPv4 address, or the
/// IPv6 address's /64 (one host or customer commonly holds a whole /64,
/// and would otherwise have 2^64 buckets).
pub fn bucket_key(ip: IpAddr) -> Vec<u8> {
    match canonical(ip) {
        IpAddr::V4(ip) => [&b"ip:"[..], &ip.octets()].concat(),
        IpAddr::V6(ip) => [&b"ip:"[..], &ip.octets()[..8]].concat(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().expect("cidr")).collect()
    }

    #[test]
    fn blocks_contain_their_addresses() {
        let net: Cidr = "10.1.0.0/16".parse().expect("cidr");
        assert!(net.contains(ip("10.1.200.3")));
        assert!(net.contains(ip("::ffff:10.1.0.1")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(!net.contains(ip("2001:db8::1")));
        let v6: Cidr = "2001:db8::/32".parse().expect("cidr");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        let one: Cidr = "127.0.0.1".parse().expect("cidr");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let all: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "x", "::/129", "1.2.3.4/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_trusted_proxy_names_the_client() {
        let trusted = cidrs(&["10.0.0.0/8"]);
        let xff: &[&[u8]] = &[b"203.0.113.7, 10.0.0.9"];
        // From the proxy: the nearest untrusted hop.
        assert_eq!(
            client_address(ip("10.0.0.1"), &[], xff, &trusted),
            ip("203.0.113.7")
        );
        // From anyone else: the header is ignored.
        assert_eq!(
            client_address(ip("198.51.100.1"), &[], xff, &trusted),
            ip("198.51.100.1")
        );
        // A client that forges hops to the left gains nothing.
        let forged: &[&[u8]] = &[b"1.1.1.1, 203.0.113.7"];
        assert_eq!(
            client_address(ip("10.0.0.1"), &[], forged, &trusted),
            ip("203.0.113.7")
        );
        // Forwarded wins over X-Forwarded-For; quoted IPv6 with a port.
        let fwd: &[&[u8]] = &[b"for=192.0.2.60;proto=http, for=\"[2001:db8::1]:4711\""];
        assert_eq!(
            client_address(ip("10.0.0.1"), fwd, xff, &trusted),
            ip("2001:db8::1")
        );
        // Garbage stops at the proxy.
        let junk: &[&[u8]] = &[b"unknown"];
        assert_eq!(
            client_address(ip("10.0.0.1"), &[], junk, &trusted),
            ip("10.0.0.1")
        );
        assert_eq!(
            client_address(ip("10.0.0.1"), &[], &[], &trusted),
            ip("10.0.0.1")
        );
        // Every hop trusted: the farthest.
        let inner: &[&[u8]] = &[b"10.9.9.9:1234"];
        assert_eq!(
            client_address(ip("10.0.0.1"), &[], inner, &trusted),
            ip("10.9.9.9")
        );
    }

    #[test]
    fn an_ipv6_slash_64_is_one_bucket_and_mapped_ipv4_is_ipv4() {
        assert_eq!(
            bucket_key(ip("2001:db8:1:2::1")),
            bucket_key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            bucket_key(ip("2001:db8:1:2::1")),
            bucket_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            bucket_key(ip("::ffff:192.0.2.1")),
            bucket_key(ip("192.0.2.1"))
        );
        assert_ne!(bucket_key(ip("192.0.2.1")), bucket_key(ip("192.0.2.2")));
    }
}
