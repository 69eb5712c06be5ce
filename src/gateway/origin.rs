//! Cross-origin protection when authentication is off, in the manner of
//! Go 1.25's `http.CrossOriginProtection`: a browser on any web page can
//! POST to a server on its user's network (a `text/plain` body needs no
//! CORS preflight), so a state-changing request a browser marks as coming
//! from another site is refused. Browsers say so in `Sec-Fetch-Site` (all
//! current ones) or, failing that, in an `Origin` that differs from `Host`.
//! A request with neither header is not from a browser page (curl, another
//! program) and passes; so do safe methods, and origins allow-listed with
//! `--allowed-origins`. With authentication on, this is not needed: a page
//! cannot attach a bearer token it does not have.

use crate::http::{Method, Request};

/// Why a request is refused; `None` if it may go on.
pub fn cross_origin_refusal(req: &Request, allowed: &[String]) -> Option<&'static str> {
    if matches!(req.method, Method::Get | Method::Head) {
        return None;
    }
    let origin = single(req, "origin");
    if let Some(origin) = origin
        && allowed.iter().any(|a| a.as_bytes() == origin)
    {
        return None;
    }
    match single(req, "sec-fetch-site") {
        Some(b"same-origin" | b"none") => return None,
        Some(_) => {
            return Some(
                "cross-origin request refused (Sec-Fetch-Site); allow its origin with --allowed-origins",
            );
        }
        None => {}
    }
    let origin = origin?;
    let host = single(req, "host").unwrap_or_default();
    if origin_host(origin) == Some(host) {
        return None;
    }
    Some("cross-origin request refused (Origin differs from Host); allow it with --allowed-origins")
}

fn single<'a>(req: &'a Request, name: &'a str) -> Option<&'a [u8]> {
    req.header_values(name).next()
}

/// The `host[:port]` of a serialized origin, `scheme://host[:port]`.
fn origin_host(origin: &[u8]) -> Option<&[u8]> {
    let at = origin.windows(3).position(|w| w == b"://")?;
    Some(&origin[at + 3..])
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::http::codec::{Limits, RequestDecoder};

    fn req(method: &str, headers: &str) -> Request {
        let text = format!(
            "{method} /api/send HTTP/1.1\r\nHost: chat.local:8080\r\n{headers}Content-Length: 0\r\n\r\n"
        );
        let mut buf = BytesMut::from(text.as_bytes());
        RequestDecoder::new(Limits::default())
            .decode(&mut buf)
            .expect("valid")
            .expect("whole")
    }

    #[test]
    fn browsers_cross_site_unsafe_requests_are_refused() {
        let none: &[String] = &[];
        let refused = |m: &str, h: &str| cross_origin_refusal(&req(m, h), none).is_some();
        // Not from a browser page: no header at all.
        assert!(!refused("POST", ""));
        assert!(!refused("POST", "Sec-Fetch-Site: same-origin\r\n"));
        assert!(!refused("POST", "Sec-Fetch-Site: none\r\n"));
        assert!(refused("POST", "Sec-Fetch-Site: cross-site\r\n"));
        assert!(refused("POST", "Sec-Fetch-Site: same-site\r\n"));
        assert!(refused("POST", "Origin: https://evil.example\r\n"));
        assert!(!refused("POST", "Origin: http://chat.local:8080\r\n"));
        assert!(refused("POST", "Origin: null\r\n"));
        // Safe methods pass.
        assert!(!refused("GET", "Sec-Fetch-Site: cross-site\r\n"));
        // Sec-Fetch-Site decides over Origin.
        assert!(!refused(
            "POST",
            "Sec-Fetch-Site: same-origin\r\nOrigin: https://evil.example\r\n"
        ));
        let allowed = ["https://app.example".to_string()];
        let cross = req(
            "POST",
            "Sec-Fetch-Site: cross-site\r\nOrigin: https://app.example\r\n",
        );
        assert_eq!(cross_origin_refusal(&cross, &allowed), None);
    }
}
