//! Which addresses a delivery may reach: the guard against an API key
//! turning the service into a proxy into its own network (SSRF).
//!
//! Private, loopback, link-local and other non-public addresses are
//! refused unless `--webhook-allow-networks` lists a network holding them;
//! plain `http://` may only reach the listed networks. The check runs on
//! every address a host resolves to, at delivery time, in the resolver the
//! HTTP client connects with ([`GuardedResolver`]): the addresses checked
//! are the ones connected to, so a name that resolves to a public address
//! when the endpoint is created and to an internal one later (DNS
//! rebinding) is refused then.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// The networks deliveries may reach although they are not public
/// (`--webhook-allow-networks`); empty by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedNetworks(Vec<IpNet>);

impl AllowedNetworks {
    /// Parses `10.0.0.0/8,127.0.0.1,fd00::/8`: CIDR networks or single
    /// addresses, comma-separated.
    pub fn parse(text: &str) -> Result<AllowedNetworks, String> {
        let mut networks = Vec::new();
        for item in text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            let network = match item.parse::<IpNet>() {
                Ok(network) => network.trunc(),
                Err(_) => match item.parse::<IpAddr>() {
                    Ok(address) => IpNet::from(address),
                    Err(_) => {
                        return Err(format!(
                            "{item:?} is not a network (CIDR, e.g. 10.0.0.0/8) nor an address"
                        ));
                    }
                },
            };
            networks.push(network);
        }
        Ok(AllowedNetworks(networks))
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        self.0.iter().any(|network| network.contains(&address))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for AllowedNetworks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&names.join(","))
    }
}

/// How an endpoint is reached: what its addresses must satisfy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// https: any public address, or one in the allowed networks.
    Public,
    /// Plain http: only addresses in the allowed networks.
    AllowedOnly,
}

/// Why an address was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "{address} is a {class} address, not in --webhook-allow-networks ({allowed})",
        allowed = if .allowed.is_empty() { "none listed".to_string() } else { .allowed.clone() }
    )]
    NotPublic {
        address: IpAddr,
        class: &'static str,
        allowed: String,
    },
    #[error(
        "plain http:// may only reach --webhook-allow-networks ({allowed}); {address} is not in them: use https://",
        allowed = if .allowed.is_empty() { "none listed".to_string() } else { .allowed.clone() }
    )]
    PlainHttp { address: IpAddr, allowed: String },
}

/// Whether `address` may be reached with `reach`.
pub fn check(address: IpAddr, reach: Reach, allowed: &AllowedNetworks) -> Result<(), Refused> {
    let address = canonical(address);
    if allowed.contains(address) {
        return Ok(());
    }
    match (reach, class(address)) {
        (Reach::AllowedOnly, _) => Err(Refused::PlainHttp {
            address,
            allowed: allowed.to_string(),
        }),
        (Reach::Public, Some(class)) => Err(Refused::NotPublic {
            address,
            class,
            allowed: allowed.to_string(),
        }),
        (Reach::Public, None) => Ok(()),
    }
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`, or through the
/// NAT64 prefix `64:ff9b::/96`) is the IPv4 address: checked as such, or
/// `::ffff:10.0.0.1` would pass as "public IPv6".
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let [a, b, c, d, e, f, g, h] = v6.segments();
            if [a, b, c, d, e, f] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [g1, g2] = g.to_be_bytes();
                let [h1, h2] = h.to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(g1, g2, h1, h2));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// The kind of a non-public address; None for a public one. From the IANA
/// special-purpose registries: what no public endpoint has.
fn class(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) => class_v4(v4),
        IpAddr::V6(v6) => class_v6(v6),
    }
}

fn class_v4(address: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = address.octets();
    Some(match (a, b, c) {
        (0, _, _) => "this-network",
        (10, _, _) => "private",
        (100, 64..=127, _) => "shared (carrier-grade NAT)",
        (127, _, _) => "loopback",
        (169, 254, _) => "link-local",
        (172, 16..=31, _) => "private",
        (192, 0, 0) => "IETF protocol",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (192, 168, _) => "private",
        (198, 18..=19, _) => "benchmarking",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved",
        _ => return None,
    })
}

fn class_v6(address: Ipv6Addr) -> Option<&'static str> {
    let first = address.segments()[0];
    if address.is_unspecified() {
        return Some("unspecified");
    }
    if address.is_loopback() {
        return Some("loopback");
    }
    Some(match first {
        0xfe80..=0xfebf => "link-local",
        0xfc00..=0xfdff => "unique local (private)",
        0xff00..=0xffff => "multicast",
        0x2001 if address.segments()[1] == 0x0db8 => "documentation",
        0x0100 if address.segments()[1..4] == [0, 0, 0] => "discard",
        // IPv4-compatible (deprecated) and other addresses in ::/8 are
        // not routed publicly.
        0x0000 => "reserved",
        _ => return None,
    })
}

/// The HTTP client's resolver: resolves with the system's resolver, then
/// keeps only the addresses `reach` may connect to, so that the client
/// never connects to another. None left: the delivery fails with why.
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    pub reach: Reach,
    pub allowed: Arc<AllowedNetworks>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusal = None;
            let kept: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(
                    |address| match check(address.ip(), guard.reach, &guard.allowed) {
                        Ok(()) => true,
                        Err(refused) => {
                            refusal.get_or_insert(refused);
                            false
                        }
                    },
                )
                .collect();
            match (kept.is_empty(), refusal) {
                (true, Some(refused)) => Err(format!("{host} resolves to {refused}").into()),
                _ => Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(text: &str) -> AllowedNetworks {
        AllowedNetworks::parse(text).unwrap()
    }

    #[test]
    fn non_public_addresses_are_refused_unless_listed() {
        let none = AllowedNetworks::default();
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            let address: IpAddr = refused.parse().unwrap();
            assert!(
                matches!(
                    check(address, Reach::Public, &none),
                    Err(Refused::NotPublic { .. })
                ),
                "{refused}"
            );
        }
        for public in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            let address: IpAddr = public.parse().unwrap();
            assert_eq!(check(address, Reach::Public, &none), Ok(()), "{public}");
        }
    }

    #[test]
    fn listed_networks_are_reachable_and_plain_http_reaches_only_them() {
        let listed = allowed("127.0.0.0/8, 10.0.0.1,fd00::/8");
        let loopback: IpAddr = "127.0.0.5".parse().unwrap();
        assert_eq!(check(loopback, Reach::Public, &listed), Ok(()));
        assert_eq!(check(loopback, Reach::AllowedOnly, &listed), Ok(()));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(check(mapped, Reach::AllowedOnly, &listed), Ok(()));
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(check(other, Reach::Public, &listed).is_err());
        let public: IpAddr = "1.1.1.1".parse().unwrap();
        let refused = check(public, Reach::AllowedOnly, &listed).unwrap_err();
        assert!(refused.to_string().contains("use https://"), "{refused}");
        assert_eq!(listed.to_string(), "127.0.0.0/8,10.0.0.1/32,fd00::/8");
    }

    #[test]
    fn bad_networks_are_named() {
        let err = AllowedNetworks::parse("10.0.0.0/8,intranet").unwrap_err();
        assert!(err.contains("\"intranet\""), "{err}");
        assert!(AllowedNetworks::parse("10.0.0.0/33").is_err());
        assert!(AllowedNetworks::parse("").unwrap().is_empty());
    }
}
