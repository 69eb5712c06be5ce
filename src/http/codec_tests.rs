use super::*;

fn decoder() -> RequestDecoder {
    RequestDecoder::new(Limits::default())
}

/// Feeds `input` one byte at a time and collects every request decoded.
fn decode_bytewise(input: &[u8]) -> Result<Vec<Request>, HttpError> {
    let mut dec = decoder();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for &b in input {
        buf.extend_from_slice(&[b]);
        while let Some(req) = dec.decode(&mut buf)? {
            out.push(req);
        }
    }
    Ok(out)
}

fn decode_all(input: &[u8]) -> Result<Vec<Request>, HttpError> {
    let mut dec = decoder();
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    while let Some(req) = dec.decode(&mut buf)? {
        out.push(req);
    }
    Ok(out)
}

#[test]
fn content_length_body_split_anywhere() {
    let input = b"POST /api/send HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /ping HTTP/1.1\r\nHost: x\r\n\r\n";
    for reqs in [decode_bytewise(input), decode_all(input)] {
        let reqs = reqs.expect("valid input");
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].method, Method::Post);
        assert_eq!(&reqs[0].body[..], b"hello");
        assert_eq!(&reqs[1].target[..], b"/ping");
        assert!(reqs[1].body.is_empty());
        assert!(reqs.iter().all(|r| r.keep_alive));
    }
}

#[test]
fn chunked_body_with_extensions_and_trailers() {
    let input = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n";
    for reqs in [decode_bytewise(input), decode_all(input)] {
        let reqs = reqs.expect("valid chunked input");
        assert_eq!(reqs.len(), 1);
        assert_eq!(&reqs[0].body[..], b"hello world");
    }
}

#[test]
fn keep_alive_rules() {
    let r = |s: &[u8]| decode_all(s).expect("valid")[0].keep_alive;
    assert!(r(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert!(!r(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ));
    assert!(!r(b"GET / HTTP/1.0\r\n\r\n"));
    assert!(r(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
}

#[test]
fn smuggling_and_bad_lengths_rejected() {
    let bad: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost : x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ];
    for input in bad {
        assert!(
            matches!(decode_all(input), Err(HttpError::BadRequest(_))),
            "accepted {:?}",
            String::from_utf8_lossy(input)
        );
    }
    assert!(matches!(
        decode_all(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        Err(HttpError::NotImplemented(_))
    ));
}

#[test]
fn limits_answered_before_the_body_arrives() {
    let head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n";
    assert_eq!(decode_all(head), Err(HttpError::PayloadTooLarge));
    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 17 * 1024));
    assert_eq!(decode_all(&big), Err(HttpError::HeadersTooLarge));
    let mut long_target = b"GET /".to_vec();
    long_target.extend(std::iter::repeat_n(b'a', 9 * 1024));
    assert_eq!(decode_all(&long_target), Err(HttpError::UriTooLong));
    long_target.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(decode_all(&long_target), Err(HttpError::UriTooLong));
}

#[test]
fn absolute_form_and_query() {
    let reqs =
        decode_all(b"GET http://example.com:8080/api/pull?chat=a HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("valid");
    assert_eq!(
        reqs[0].path_and_query(),
        (&b"/api/pull"[..], Some(&b"chat=a"[..]))
    );
    let reqs = decode_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").expect("valid");
    assert_eq!(reqs[0].path_and_query(), (&b"/ping"[..], None));
}

#[test]
fn expect_continue_reported_once_while_body_pending() {
    let mut dec = decoder();
    let mut buf = BytesMut::from(
        &b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"[..],
    );
    assert_eq!(dec.decode(&mut buf), Ok(None));
    assert!(dec.take_expect_continue());
    assert!(!dec.take_expect_continue());
    buf.extend_from_slice(b"ok");
    assert_eq!(
        dec.decode(&mut buf).expect("valid").map(|r| r.body),
        Some(Bytes::from_static(b"ok"))
    );
}

/// Found by the `http_request` fuzz target: limits of usize::MAX (reachable
/// through the flags) overflowed `limit + 1`.
#[test]
fn unbounded_limits_do_not_overflow() {
    let limits = Limits {
        max_head: usize::MAX,
        max_headers: 64,
        max_body: usize::MAX,
        max_request_line: usize::MAX,
    };
    for input in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let mut dec = RequestDecoder::new(limits);
        let mut buf = BytesMut::from(input);
        assert!(dec.decode(&mut buf).expect("valid").is_some());
    }
}

#[test]
fn absolute_form_only_when_the_target_starts_with_a_scheme() {
    let pq = |target: &str| {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
        let req = decode_all(raw.as_bytes()).expect("valid").remove(0);
        let (path, query) = req.path_and_query();
        (
            String::from_utf8_lossy(path).into_owned(),
            query.map(|q| String::from_utf8_lossy(q).into_owned()),
        )
    };
    let owned = |p: &str, q: Option<&str>| (p.to_string(), q.map(str::to_string));
    assert_eq!(pq("/ping?u=http://x"), owned("/ping", Some("u=http://x")));
    assert_eq!(
        pq("/api/pull?chat=http://h/api/pull?chat=c1"),
        owned("/api/pull", Some("chat=http://h/api/pull?chat=c1"))
    );
    assert_eq!(pq("HTTPS://h:1/a?b"), owned("/a", Some("b")));
    assert_eq!(pq("http://h?q"), owned("", Some("q")));
    assert_eq!(pq("http://h"), owned("/", None));
    // Not a scheme: must start with a letter, and only [A-Za-z0-9+.-].
    assert_eq!(pq("1http://h/a"), owned("1http://h/a", None));
    assert_eq!(pq("a_b://h/a"), owned("a_b://h/a", None));
}

#[test]
fn host_header_rules() {
    let bad = |raw: &[u8]| matches!(decode_all(raw), Err(HttpError::BadRequest(_)));
    assert!(bad(b"GET / HTTP/1.1\r\n\r\n"), "HTTP/1.1 without Host");
    assert!(bad(b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"));
    assert!(bad(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n"));
    assert!(
        decode_all(b"GET / HTTP/1.0\r\n\r\n").is_ok(),
        "HTTP/1.0 may omit Host"
    );
    assert!(
        decode_all(b"GET / HTTP/1.1\r\nHOST:\r\n\r\n").is_ok(),
        "an empty Host is allowed"
    );
}

#[test]
fn header_values_are_found_case_insensitively_and_trimmed() {
    let input = b"\r\nPOST /k:v HTTP/1.1\r\nHost: x\r\nidempotency-KEY:  a b \r\nX: 1\nIdempotency-Key:c\r\nContent-Length: 0\r\n\r\n";
    let reqs = decode_all(input).expect("valid input");
    let values: Vec<&[u8]> = reqs[0].header_values("Idempotency-Key").collect();
    assert_eq!(values, [&b"a b"[..], b"c"]);
    assert_eq!(reqs[0].header_values("x").collect::<Vec<_>>(), [b"1"]);
    assert_eq!(reqs[0].header_values("absent").count(), 0);
    // The request line is not a header, whatever its target holds.
    assert_eq!(reqs[0].header_values("POST /k").count(), 0);
}

/// The fields indexed by the parse read exactly as a scan of the head reads
/// them: present once, absent, repeated (then in order), empty, in any
/// case and with any surrounding whitespace, beside fields not indexed;
/// requests one after another in one buffer each keep their own.
#[test]
fn indexed_fields_read_as_a_scan_of_the_head() {
    let input = b"POST /a HTTP/1.1\r\nHost: x\r\nCONTENT-type:  application/json \r\n\
        Origin: http://o\r\nAccept:\r\nForwarded: for=1\r\nforwarded: for=2\r\n\
        X-Forwarded-For: 10.0.0.1\r\nAuthorization: Bearer a\r\nauthorization: Bearer b\r\n\
        Sec-Fetch-Site: same-origin\r\nContent-Length: 0\r\n\r\n\
        GET /b HTTP/1.1\r\nhost: y\r\nidempotency-key: k1\r\nLast-Event-ID: 12.3\r\n\r\n";
    let reqs = decode_all(input).expect("valid input");
    assert_eq!(reqs.len(), 2);
    let names = INDEXED
        .iter()
        .copied()
        .chain(["host", "x-absent", "Content-Type"]);
    for req in &reqs {
        for name in names.clone() {
            let indexed: Vec<&[u8]> = req.header_values(name).collect();
            let scanned: Vec<&[u8]> = scan_values(&req.head, name).collect();
            assert_eq!(indexed, scanned, "{name} in {:?}", req.target);
        }
    }
    let values = |i: usize, name| reqs[i].header_values(name).collect::<Vec<_>>();
    assert_eq!(values(0, "content-type"), [b"application/json"]);
    assert_eq!(values(0, "accept"), [b""]);
    assert_eq!(values(0, "forwarded"), [&b"for=1"[..], b"for=2"]);
    assert_eq!(values(0, "authorization"), [&b"Bearer a"[..], b"Bearer b"]);
    assert!(values(0, "idempotency-key").is_empty());
    assert_eq!(values(1, "idempotency-key"), [b"k1"]);
    assert_eq!(values(1, "last-event-id"), [b"12.3"]);
    assert!(values(1, "content-type").is_empty());
    assert_eq!(values(0, "sec-fetch-site"), [b"same-origin"]);
    assert!(values(1, "sec-fetch-site").is_empty());
    assert_eq!(values(0, "host"), [b"x"]);
    assert_eq!(values(1, "host"), [b"y"]);
}

#[test]
fn a_bare_cr_or_other_control_in_a_chunk_extension_is_refused() {
    for ext in [&b"5;a\rb"[..], b"5;a\x00", b"5;a=\"x\x7fy\"", b"5\r;a"] {
        let mut input =
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        input.extend_from_slice(ext);
        input.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        for result in [decode_all(&input), decode_bytewise(&input)] {
            assert!(
                matches!(result, Err(HttpError::BadRequest(_))),
                "{:?}: {result:?}",
                String::from_utf8_lossy(ext)
            );
        }
    }
    // A tab is allowed (whitespace around `;` and `=`).
    let input = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\t;a=1\r\nhello\r\n0\r\n\r\n";
    assert_eq!(decode_all(input).expect("valid")[0].body, &b"hello"[..]);
}

#[test]
fn an_upgrade_naming_websocket_is_read_in_the_parse() {
    let upgrade = |fields: &str| {
        let head = format!("GET /api/ws HTTP/1.1\r\nHost: x\r\n{fields}\r\n");
        decode_all(head.as_bytes()).expect("valid")[0].upgrade_websocket
    };
    assert!(upgrade("Upgrade: websocket\r\n"));
    assert!(upgrade("upgrade: h2c, WebSocket \r\n"));
    assert!(upgrade("Upgrade: h2c\r\nUpgrade: websocket\r\n"));
    assert!(!upgrade(""));
    assert!(!upgrade("Upgrade: h2c\r\n"));
    assert!(!upgrade("X-Upgrade: websocket\r\n"));
    assert!(!upgrade("Upgrade: websocket-ish\r\n"));
}
