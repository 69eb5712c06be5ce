//! Where Redis is: `redis://[[user]:password@]host[:port][/db]`,
//! `unix:///path/to/redis.sock[?db=N&password=P]`, or a bare socket path;
//! for a cluster, also several seed nodes sharing the credentials:
//! `redis://[[user]:password@]h1:7000,h2:7001[/db]` ([`parse_list`]).

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Unix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub address: Address,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl std::fmt::Display for RedisTarget {
    /// The target without its password, for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.address {
            Address::Tcp(addr) => write!(f, "redis://{addr}/{}", self.db),
            Address::Unix(path) => write!(f, "unix://{path}?db={}", self.db),
        }
    }
}

pub fn parse(url: &str) -> Result<RedisTarget, String> {
    let bad = |why: &str| format!("invalid Redis URL {url:?}: {why}");
    if url.starts_with('/') {
        return parse_unix(url, None).map_err(|e| bad(&e));
    }
    if let Some(rest) = url
        .strip_prefix("unix://")
        .or_else(|| url.strip_prefix("redis+unix://"))
    {
        let (path, query) = rest
            .split_once('?')
            .map_or((rest, None), |(p, q)| (p, Some(q)));
        return parse_unix(path, query).map_err(|e| bad(&e));
    }
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| bad("expected redis://, unix:// or an absolute socket path"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host)) => (Some(userinfo), host),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(info) => match info.split_once(':') {
            Some((user, pass)) => (
                non_empty(percent_decode(user)),
                non_empty(percent_decode(pass)),
            ),
            None => (non_empty(percent_decode(info)), None),
        },
    };
    let host_port = if host_port.is_empty() {
        "127.0.0.1"
    } else {
        host_port
    };
    let has_port = match host_port.strip_prefix('[') {
        Some(ipv6) => ipv6.contains("]:"),
        None => host_port.contains(':'),
    };
    let address = if has_port {
        host_port.to_string()
    } else {
        format!("{host_port}:6379")
    };
    let db = match path.split('?').next().unwrap_or("") {
        "" => 0,
        db => db
            .parse()
            .map_err(|_| bad("the database must be a number"))?,
    };
    Ok(RedisTarget {
        address: Address::Tcp(address),
        username,
        password,
        db,
    })
}

/// A URL naming one node, or several comma-separated seed nodes of a
/// cluster (`redis://:pw@h1:7000,h2:7001`): one target per node, each with
/// the shared credentials.
pub fn parse_list(url: &str) -> Result<Vec<RedisTarget>, String> {
    let Some(rest) = url.strip_prefix("redis://") else {
        return parse(url).map(|target| vec![target]);
    };
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, None), |(a, p)| (a, Some(p)));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    if !hosts.contains(',') {
        return parse(url).map(|target| vec![target]);
    }
    hosts
        .split(',')
        .map(|host| {
            if host.is_empty() {
                return Err(format!(
                    "invalid Redis URL {url:?}: an empty node in the list"
                ));
            }
            let mut one = String::from("redis://");
            if let Some(userinfo) = userinfo {
                one.push_str(userinfo);
                one.push('@');
            }
            one.push_str(host);
            if let Some(path) = path {
                one.push('/');
                one.push_str(path);
            }
            parse(&one)
        })
        .collect()
}

fn parse_unix(path: &str, query: Option<&str>) -> Result<RedisTarget, String> {
    if path.is_empty() {
        return Err("empty socket path".into());
    }
    let mut target = RedisTarget {
        address: Address::Unix(path.to_string()),
        username: None,
        password: None,
        db: 0,
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("db", db)) => {
                target.db = db
                    .parse()
                    .map_err(|_| "the database must be a number".to_string())?
            }
            Some(("password", pass)) => target.password = non_empty(percent_decode(pass)),
            Some(("user", user)) => target.username = non_empty(percent_decode(user)),
            _ => return Err(format!("unknown parameter {pair:?}")),
        }
    }
    Ok(target)
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Decodes `%XX` escapes (passwords may contain `@` or `:`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|&b| hex(b)),
            bytes.get(i + 2).and_then(|&b| hex(b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(addr: &str, password: Option<&str>, db: u32) -> RedisTarget {
        RedisTarget {
            address: Address::Tcp(addr.into()),
            username: None,
            password: password.map(Into::into),
            db,
        }
    }

    #[test]
    fn tcp_urls() {
        assert_eq!(
            parse("redis://127.0.0.1:6379"),
            Ok(tcp("127.0.0.1:6379", None, 0))
        );
        assert_eq!(parse("redis://10.0.0.3"), Ok(tcp("10.0.0.3:6379", None, 0)));
        assert_eq!(
            parse("redis://:s%40cret@host:7000/3"),
            Ok(tcp("host:7000", Some("s@cret"), 3))
        );
        assert_eq!(
            parse("redis://[::1]:6380/1"),
            Ok(tcp("[::1]:6380", None, 1))
        );
        assert_eq!(parse("redis://[::1]"), Ok(tcp("[::1]:6379", None, 0)));
        let with_user = parse("redis://alice:pw@h:1/0").expect("valid");
        assert_eq!(
            (with_user.username.as_deref(), with_user.password.as_deref()),
            (Some("alice"), Some("pw"))
        );
        assert!(parse("redis://h:1/x").is_err());
        assert!(parse("http://h").is_err());
    }

    #[test]
    fn seed_lists_share_credentials() {
        assert_eq!(
            parse_list("redis://:p,w@h1:7000,h2,[::1]:7002"),
            Ok(vec![
                tcp("h1:7000", Some("p,w"), 0),
                tcp("h2:6379", Some("p,w"), 0),
                tcp("[::1]:7002", Some("p,w"), 0),
            ])
        );
        assert_eq!(parse_list("redis://h:1/2"), Ok(vec![tcp("h:1", None, 2)]));
        assert_eq!(parse_list("/run/r.sock").map(|t| t.len()), Ok(1));
        assert!(parse_list("redis://h1:1,,h2:2").is_err());
        assert!(parse_list("redis://h1:1,h2:2/x").is_err());
    }

    #[test]
    fn unix_urls() {
        let t = parse("unix:///tmp/r.sock?db=2&password=p").expect("valid");
        assert_eq!(t.address, Address::Unix("/tmp/r.sock".into()));
        assert_eq!((t.db, t.password.as_deref()), (2, Some("p")));
        assert_eq!(
            parse("/run/redis.sock").map(|t| t.address),
            Ok(Address::Unix("/run/redis.sock".into()))
        );
        assert!(parse("unix://").is_err());
    }
}
