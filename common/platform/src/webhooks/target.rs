//! Which targets a webhook may call (SSRF): `https` only, a host name (never
//! an IP literal, in whatever form: the `url` crate reads `2130706433`,
//! `0x7f.1` and `0177.0.0.1` as 127.0.0.1, so they are literals too), and
//! every address it resolves to public: not private, loopback, link-local,
//! unique-local, unspecified, broadcast, multicast, shared (CGNAT),
//! documentation or reserved, including those forms embedded in IPv6
//! (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64
//! `64:ff9b::/96`, 6to4 `2002::/16`; Teredo refused whole).
//! `WEBHOOK_ALLOW_PRIVATE=true` lifts all of it and allows `http`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not a URL this service can call.
    #[error("url: {0}")]
    BadUrl(String),
    /// The host is an IP address (only names are allowed).
    #[error("url: the host must be a name, not an IP address")]
    IpLiteral,
    /// The host resolves to an address that is not public.
    #[error("url: the host resolves to a non-public address ({0})")]
    Forbidden(IpAddr),
    /// The host did not resolve.
    #[error("url: the host does not resolve: {0}")]
    Unresolved(String),
}

/// Checks `raw` as a webhook target: its shape only (the addresses are
/// checked by whoever resolves it). Returns the parsed URL.
pub fn check_url(raw: &str, allow_private: bool) -> Result<Url, TargetError> {
    if raw.len() > MAX_URL_LEN {
        return Err(TargetError::BadUrl(format!(
            "at most {MAX_URL_LEN} characters"
        )));
    }
    let url = Url::parse(raw).map_err(|e| TargetError::BadUrl(format!("not a URL ({e})")))?;
    match (url.scheme(), allow_private) {
        ("https", _) | ("http", true) => {}
        _ => {
            return Err(TargetError::BadUrl("must be an https:// URL".to_owned()));
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(TargetError::BadUrl(
            "must not carry a user name or password".to_owned(),
        ));
    }
    if url.fragment().is_some() {
        return Err(TargetError::BadUrl("must not have a fragment".to_owned()));
    }
    match url.host() {
        None => return Err(TargetError::BadUrl("has no host".to_owned())),
        Some(Host::Ipv4(_)) if !allow_private => return Err(TargetError::IpLiteral),
        Some(Host::Ipv6(_)) if !allow_private => return Err(TargetError::IpLiteral),
        Some(Host::Domain("")) => {
            return Err(TargetError::BadUrl("has no host".to_owned()));
        }
        _ => {}
    }
    Ok(url)
}

/// Whether `ip` may be called (a public unicast address), unless private
/// targets are allowed.
pub fn check_address(ip: IpAddr, allow_private: bool) -> Result<(), TargetError> {
    if allow_private || is_public(ip) {
        Ok(())
    } else {
        Err(TargetError::Forbidden(ip))
    }
}

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                   // "this network", 0.0.0.0
        || a == 10                             // private
        || a == 127                            // loopback
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 169 && b == 254)              // link-local (cloud metadata)
        || (a == 172 && (16..32).contains(&b)) // private
        || (a == 192 && b == 0 && c == 0)      // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)      // documentation
        || (a == 192 && b == 88 && c == 99)    // 6to4 relay anycast
        || (a == 192 && b == 168)              // private
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 198 && b == 51 && c == 100)   // documentation
        || (a == 203 && b == 0 && c == 113)    // documentation
        || a >= 224) // multicast, reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // IPv4 inside IPv6: judged by the IPv4 address it carries.
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if s[..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0) {
        // ::ffff:a.b.c.d (mapped), ::a.b.c.d (compatible; also :: and ::1)
        return is_public_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        // NAT64 well-known prefix.
        return is_public_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        // 6to4: the IPv4 address follows the prefix.
        return is_public_v4(embedded(s[1], s[2]));
    }
    !((s[0] & 0xfe00) == 0xfc00                 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80           // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0           // site-local (deprecated)
        || (s[0] & 0xff00) == 0xff00           // multicast
        || (s[0] == 0x2001 && s[1] == 0x0db8)  // documentation
        || (s[0] == 0x2001 && s[1] == 0)       // Teredo (embeds any IPv4)
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // discard-only
        || s[0] == 0) // the rest of ::/16 (reserved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn non_public_addresses_are_refused_in_every_form() {
        for bad in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "fec0::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "2001:db8::1",
            "2001::1",
        ] {
            assert!(!is_public(ip(bad)), "{bad} must be refused");
            assert_eq!(
                check_address(ip(bad), false),
                Err(TargetError::Forbidden(ip(bad)))
            );
            assert_eq!(
                check_address(ip(bad), true),
                Ok(()),
                "{bad} allowed when private is"
            );
        }
    }

    #[test]
    fn public_addresses_pass() {
        for good in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "11.0.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(ip(good)), "{good} must pass");
        }
    }

    #[test]
    fn ip_literals_are_refused_in_every_form_the_url_parser_accepts() {
        for raw in [
            "https://127.0.0.1/hook",
            "https://2130706433/hook",
            "https://0x7f000001/hook",
            "https://0177.0.0.1/hook",
            "https://127.1/hook",
            "https://[::1]/hook",
            "https://[::ffff:127.0.0.1]/hook",
            "https://[::ffff:7f00:1]/hook",
            "https://8.8.8.8/hook",
        ] {
            assert_eq!(check_url(raw, false), Err(TargetError::IpLiteral), "{raw}");
        }
        // The url crate normalises the integer and octal forms to 127.0.0.1.
        let parsed = check_url("http://2130706433/", true).expect("allowed when private is");
        assert_eq!(parsed.host_str(), Some("127.0.0.1"));
        let parsed = check_url("http://0177.0.0.1/", true).expect("allowed when private is");
        assert_eq!(parsed.host_str(), Some("127.0.0.1"));
    }

    #[test]
    fn only_https_names_without_credentials_pass() {
        assert!(check_url("https://hooks.example.com/penora?x=1", false).is_ok());
        for raw in [
            "http://hooks.example.com/",
            "ftp://hooks.example.com/",
            "https://user:pw@hooks.example.com/",
            "https://hooks.example.com/#frag",
            "not a url",
            "file:///etc/passwd",
        ] {
            assert!(
                matches!(check_url(raw, false), Err(TargetError::BadUrl(_))),
                "{raw}"
            );
        }
        assert!(check_url("http://hooks.example.com/", true).is_ok());
        assert!(check_url(&format!("https://a.example/{}", "x".repeat(3000)), false).is_err());
    }
}
