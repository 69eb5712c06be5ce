//! HTTP/1.1 protocol behaviour of the gateway (memory backend).

mod common;

use std::thread;
use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn ping_returns_pong() {
    let s = Server::memory();
    let r = request(s.http_addr(), "GET", "/ping", &[], b"");
    assert_eq!(r.status, 200, "GET /ping: {}", r.describe());
    assert_eq!(r.json(), json!({"message": "pong"}), "GET /ping body");
    assert_eq!(r.version, "HTTP/1.1", "response version");
    assert_standard_headers(&r, "GET /ping");
}

#[test]
fn unknown_path_is_404() {
    let s = Server::memory();
    for (method, path) in [
        ("GET", "/nope"),
        ("GET", "/index.html"),
        ("GET", "/api"),
        ("GET", "/api/unknown"),
        ("POST", "/api/sendx"),
        ("GET", "/api/pull/extra"),
        ("GET", "/pingpong"),
    ] {
        let r = request(s.http_addr(), method, path, &[], b"");
        assert_error(&r, 404, &format!("{method} {path}"));
        assert_standard_headers(&r, &format!("{method} {path}"));
    }
}

/// A wrong method is 405 with an `Allow` header listing the right one, with the
/// standard headers, and does not end the connection. Both with a JSON body
/// and with `Content-Length: 0`, for known and unknown methods.
#[test]
fn wrong_method_is_405_with_allow() {
    let s = Server::memory();
    let addr = s.http_addr();
    let empty: &[(&str, &str)] = &[("Content-Length", "0")];
    for (method, path, allowed, headers, body) in [
        ("GET", "/api/send", "POST", JSON_CT, &b""[..]),
        ("PUT", "/api/send", "POST", JSON_CT, b"{}"),
        ("POST", "/api/pull", "GET", JSON_CT, b"{}"),
        ("DELETE", "/api/pull", "GET", JSON_CT, b"{}"),
        ("POST", "/ping", "GET", JSON_CT, b"{}"),
        ("OPTIONS", "/api/send", "POST", empty, b""),
        ("DELETE", "/api/pull", "GET", empty, b""),
        ("PUT", "/ping", "GET", empty, b""),
        ("BREW", "/ping", "GET", empty, b""),
        ("PATCH", "/api/send", "POST", empty, b""),
        ("GET", "/api/send", "POST", empty, b""),
        ("POST", "/ping", "GET", empty, b""),
    ] {
        let ctx = format!("{method} {path} {headers:?}");
        let mut c = HttpConn::connect(addr);
        let r = c.request(method, path, headers, body);
        assert_error(&r, 405, &ctx);
        let allow = r
            .header("allow")
            .unwrap_or_else(|| panic!("{ctx}: 405 without an Allow header: {:?}", r.headers));
        assert!(
            allow.split(',').any(|m| m.trim() == allowed),
            "{ctx}: Allow header {allow:?} should list {allowed}"
        );
        assert_standard_headers(&r, &ctx);
        // a 405 does not end the connection
        let r = c.request("GET", "/ping", &[], b"");
        assert_eq!(r.status, 200, "ping after {ctx}: {}", r.describe());
    }
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let s = Server::memory();
    let mut conn = HttpConn::connect(s.http_addr());
    for i in 0..5 {
        let r = conn.request("GET", "/ping", &[], b"");
        assert_eq!(
            r.status,
            200,
            "ping #{i} on a kept-alive connection: {}",
            r.describe()
        );
        assert!(
            !r.header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close")),
            "HTTP/1.1 is keep-alive by default; got Connection: close on ping #{i}"
        );
    }
    let t = conn.send_ok("ka", "s", "kept alive");
    let page = parse_page(
        &conn.pull_json(&json!({"chat": "ka"})),
        "pull on kept-alive connection",
    );
    assert_eq!(page.times(), vec![t]);
    let page = parse_page(
        &conn.pull_query("chat=ka"),
        "query pull on kept-alive connection",
    );
    assert_eq!(page.times(), vec![t]);
    // errors don't close the connection either
    let r = conn.request("GET", "/nope", &[], b"");
    assert_eq!(r.status, 404);
    let r = conn.request("POST", "/api/send", JSON_CT, br#"{"chat":""}"#);
    assert_eq!(r.status, 400, "{}", r.describe());
    let r = conn.request("GET", "/ping", &[], b"");
    assert_eq!(
        r.status,
        200,
        "ping after error responses on the same connection: {}",
        r.describe()
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let s = Server::memory();
    let addr = s.http_addr();
    let host = addr.to_string();
    let mut conn = HttpConn::connect(addr);
    let t_a = conn.send_ok("pipe-a", "s", "in a");
    let t_b = conn.send_ok("pipe-b", "s", "in b");

    // Six requests with distinguishable responses, written with a single write.
    let mut batch = Vec::new();
    batch.extend(format_request(&host, "GET", "/ping", &[], b""));
    batch.extend(format_request(
        &host,
        "GET",
        "/api/pull",
        JSON_CT,
        br#"{"chat":"pipe-a"}"#,
    ));
    batch.extend(format_request(&host, "GET", "/nope", &[], b""));
    batch.extend(format_request(
        &host,
        "GET",
        "/api/pull?chat=pipe-b",
        &[],
        b"",
    ));
    batch.extend(format_request(
        &host,
        "POST",
        "/api/send",
        JSON_CT,
        br#"{"chat":""}"#,
    ));
    batch.extend(format_request(
        &host,
        "GET",
        "/api/pull?chat=pipe-empty",
        &[],
        b"",
    ));
    conn.write_raw(&batch);
    let ping = conn.read_response();
    assert_eq!(
        (ping.status, ping.json()),
        (200, json!({"message": "pong"})),
        "pipelined #1 (ping): {}",
        ping.describe()
    );
    let page = parse_page(&conn.read_response(), "pipelined #2 (pull pipe-a)");
    assert_eq!(
        page.times(),
        vec![t_a],
        "pipelined #2 must be the pull of pipe-a"
    );
    let r = conn.read_response();
    assert_eq!(
        r.status,
        404,
        "pipelined #3 must be the 404: {}",
        r.describe()
    );
    let page = parse_page(&conn.read_response(), "pipelined #4 (pull pipe-b)");
    assert_eq!(
        page.times(),
        vec![t_b],
        "pipelined #4 must be the pull of pipe-b"
    );
    let r = conn.read_response();
    assert_eq!(
        r.status,
        400,
        "pipelined #5 must be the 400: {}",
        r.describe()
    );
    let page = parse_page(&conn.read_response(), "pipelined #6 (pull pipe-empty)");
    assert!(
        page.messages.is_empty(),
        "pipelined #6 must be the empty pull"
    );

    // many small pipelined requests, split mid-request across writes
    let mut batch = Vec::new();
    for i in 0..50 {
        if i % 2 == 0 {
            batch.extend(format_request(&host, "GET", "/ping", &[], b""));
        } else {
            batch.extend(format_request(&host, "GET", &format!("/nope{i}"), &[], b""));
        }
    }
    for chunk in batch.chunks(37) {
        conn.write_raw(chunk);
    }
    for i in 0..50 {
        let r = conn.read_response();
        let want = if i % 2 == 0 { 200 } else { 404 };
        assert_eq!(
            r.status,
            want,
            "pipelined request #{i} of 50: {}",
            r.describe()
        );
    }
}

/// RFC 9112 section 9.3.2: a server may only process pipelined requests in parallel if
/// they are all safe; a POST must take effect before the requests after it.
#[test]
fn pipelined_requests_take_effect_in_order() {
    let s = Server::memory();
    let addr = s.http_addr();
    let host = addr.to_string();
    for round in 0..5 {
        let chat = format!("pipe{round}");
        let mut batch = Vec::new();
        for text in ["one", "two", "three"] {
            let body = json!({"chat": chat, "text": text, "sender": "s"}).to_string();
            batch.extend(format_request(
                &host,
                "POST",
                "/api/send",
                JSON_CT,
                body.as_bytes(),
            ));
        }
        let pull = json!({"chat": chat, "reverse": true}).to_string();
        batch.extend(format_request(
            &host,
            "GET",
            "/api/pull",
            JSON_CT,
            pull.as_bytes(),
        ));
        let mut conn = HttpConn::connect(addr);
        conn.write_raw(&batch); // one write
        let t1 = send_time_of(&conn.read_response(), "pipelined send one");
        let t2 = send_time_of(&conn.read_response(), "pipelined send two");
        let t3 = send_time_of(&conn.read_response(), "pipelined send three");
        let page = parse_page(&conn.read_response(), "pipelined pull after the sends");
        assert!(
            t1 < t2 && t2 < t3,
            "round {round}: pipelined sends on one connection must take effect in order, got send_times {t1}, {t2}, {t3}"
        );
        assert_eq!(
            page.texts(),
            vec!["one", "two", "three"],
            "round {round}: a pull pipelined after three sends must see all three, oldest first"
        );
    }
}

#[test]
fn request_split_across_writes() {
    let s = Server::memory();
    let addr = s.http_addr();
    let req = format_request(
        &addr.to_string(),
        "POST",
        "/api/send",
        JSON_CT,
        br#"{"chat":"split","text":"slow","sender":"s"}"#,
    );
    let mut conn = HttpConn::connect(addr);
    for chunk in req.chunks(7) {
        conn.write_raw(chunk);
        thread::sleep(Duration::from_millis(5));
    }
    let t = send_time_of(&conn.read_response(), "send written 7 bytes at a time");
    let page = pull_page(addr, "split", 0, 10, false);
    assert_eq!(page.times(), vec![t]);
}

#[test]
fn connection_close_is_honoured() {
    let s = Server::memory();
    let mut conn = HttpConn::connect(s.http_addr());
    let r = conn.request("GET", "/ping", &[("Connection", "close")], b"");
    assert_eq!(r.status, 200, "{}", r.describe());
    conn.assert_closed("after a request with Connection: close");

    let mut conn = HttpConn::connect(s.http_addr());
    let r = conn.request(
        "POST",
        "/api/send",
        &[
            ("Content-Type", "application/json"),
            ("Connection", "close"),
        ],
        br#"{"chat":"cc","text":"t","sender":"s"}"#,
    );
    send_time_of(&r, "send with Connection: close");
    conn.assert_closed("after a send with Connection: close");
}

#[test]
fn http_1_0_closes_unless_keep_alive() {
    let s = Server::memory();
    let addr = s.http_addr();

    let mut conn = HttpConn::connect(addr);
    conn.write_raw(b"GET /ping HTTP/1.0\r\n\r\n");
    let r = conn.read_response();
    assert_eq!(r.status, 200, "HTTP/1.0 ping: {}", r.describe());
    assert_eq!(r.json(), json!({"message": "pong"}));
    conn.assert_closed("HTTP/1.0 without keep-alive");

    let mut conn = HttpConn::connect(addr);
    for (request, what) in [
        (
            &b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"[..],
            "keep-alive ping #1",
        ),
        (
            b"GET /ping HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
            "keep-alive ping #2 on the same connection",
        ),
        (b"GET /ping HTTP/1.0\r\n\r\n", "ping #3 (no keep-alive)"),
    ] {
        conn.write_raw(request);
        let r = conn.read_response();
        assert_eq!(r.status, 200, "HTTP/1.0 {what}: {}", r.describe());
    }
    conn.assert_closed("HTTP/1.0 after a request without keep-alive");

    // a 1.0 send with a body
    let body = br#"{"chat":"old","text":"t","sender":"s"}"#;
    let mut conn = HttpConn::connect(addr);
    let mut req = format!(
        "POST /api/send HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    conn.write_raw(&req);
    send_time_of(&conn.read_response(), "HTTP/1.0 send");
    conn.assert_closed("HTTP/1.0 send");
}

#[test]
fn standard_headers_on_every_response() {
    let s = Server::memory();
    let addr = s.http_addr();
    let cases: Vec<(&str, &str, &[u8], u16)> = vec![
        ("GET", "/ping", b"", 200),
        (
            "POST",
            "/api/send",
            br#"{"chat":"h","text":"t","sender":"s"}"#,
            200,
        ),
        ("GET", "/api/pull", br#"{"chat":"h"}"#, 200),
        ("GET", "/api/pull?chat=h", b"", 200),
        ("POST", "/api/send", b"{", 400),
        ("GET", "/nope", b"", 404),
        ("GET", "/api/send", b"", 405),
    ];
    for (method, path, body, status) in cases {
        let r = request(addr, method, path, JSON_CT, body);
        let ctx = format!("{method} {path}");
        assert_eq!(r.status, status, "{ctx}: {}", r.describe());
        assert_standard_headers(&r, &ctx);
    }
}

#[test]
fn head_ping_has_headers_only() {
    let s = Server::memory();
    let addr = s.http_addr();
    let get = request(addr, "GET", "/ping", &[], b"");
    let mut conn = HttpConn::connect(addr);
    // HEAD then GET pipelined: if HEAD carried a body, the GET response would be garbled.
    conn.write_request("HEAD", "/ping", &[], b"");
    conn.write_request("GET", "/ping", &[], b"");
    let head = conn.read_head_response();
    assert_eq!(head.status, 200, "HEAD /ping: {}", head.describe());
    assert_eq!(
        head.header("content-length"),
        Some(get.body.len().to_string().as_str()),
        "HEAD /ping: Content-Length must be the GET body's length: {:?}",
        head.headers
    );
    assert!(head.header("date").is_some(), "HEAD /ping: Date header");
    assert!(
        head.header("content-type").is_some(),
        "HEAD /ping: Content-Type header"
    );
    let next = conn.try_read_response().unwrap_or_else(|e| {
        panic!("the response after HEAD /ping is garbled (did HEAD send a body?): {e}")
    });
    assert_eq!(next.status, 200, "GET after HEAD: {}", next.describe());
    assert_eq!(next.text(), r#"{"message":"pong"}"#, "GET after HEAD");
}

#[test]
fn header_names_are_case_insensitive() {
    let s = Server::memory();
    let addr = s.http_addr();
    let body = br#"{"chat":"case","text":"t","sender":"s"}"#;
    let mut req = format!(
        "POST /api/send HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    send_time_of(&raw_request(addr, &req), "lowercase headers");
    let mut req = format!(
        "POST /api/send HTTP/1.1\r\nHOST: {addr}\r\nCONTENT-TYPE: application/json\r\nCONTENT-LENGTH: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    send_time_of(&raw_request(addr, &req), "uppercase headers");
    let mut conn = HttpConn::connect(addr);
    let r = conn.request("GET", "/ping", &[("CONNECTION", "CLOSE")], b"");
    assert_eq!(r.status, 200);
    conn.assert_closed("Connection: CLOSE (uppercase)");

    // mixed case, with a pipelined request whose Connection: close is mixed case too
    let body = send_body("oddcase", "s", "odd case");
    let req = format!(
        "POST /api/send HTTP/1.1\r\nhOsT: x\r\ncOnTeNt-TyPe: application/json\r\ncOnTeNt-LeNgTh: {}\r\n\r\n{body}GET /ping HTTP/1.1\r\nHost: x\r\ncOnNeCtIoN: ClOsE\r\n\r\n",
        body.len()
    );
    let mut c = HttpConn::connect(addr);
    c.write_raw(req.as_bytes());
    send_time_of(&c.read_response(), "cOnTeNt-LeNgTh");
    let r = c.read_response();
    assert_eq!(r.status, 200, "{}", r.describe());
    c.assert_closed("cOnNeCtIoN: ClOsE is honoured");
    // odd-case Transfer-Encoding too
    let body = send_body("oddcase", "s", "odd case chunked");
    let mut req =
        b"POST /api/send HTTP/1.1\r\nHost: x\r\ntRaNsFeR-eNcOdInG: ChUnKeD\r\n\r\n".to_vec();
    req.extend(chunked_body(body.as_bytes(), 7));
    let mut c = HttpConn::connect(addr);
    c.write_raw(&req);
    send_time_of(&c.read_response(), "tRaNsFeR-eNcOdInG: ChUnKeD");
    let page = pull_page(addr, "oddcase", 0, 10, true);
    assert_eq!(page.texts(), vec!["odd case", "odd case chunked"]);
}

#[test]
fn many_concurrent_connections() {
    let s = Server::memory();
    let addr = s.http_addr();
    // open many idle connections first, then use them all
    let mut conns: Vec<HttpConn> = (0..200).map(|_| HttpConn::connect(addr)).collect();
    for (i, c) in conns.iter_mut().enumerate().rev() {
        let r = c.request("GET", "/ping", &[], b"");
        assert_eq!(r.status, 200, "ping on connection #{i}: {}", r.describe());
    }
    let handles: Vec<_> = (0..16)
        .map(|i| {
            thread::spawn(move || {
                let mut c = HttpConn::connect(addr);
                for j in 0..50 {
                    c.send_ok("conc", &format!("t{i}"), &format!("{j}"));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("sender thread");
    }
    let all = walk(&mut HttpConn::connect(addr), "conc", 100, true, Form::Json);
    assert_eq!(all.len(), 16 * 50, "all concurrent sends stored");
}

/// curl 7.88 sends `Expect: 100-continue` for POST bodies over 1 KiB and waits up to
/// 1 s for an interim response before sending the body anyway.
#[test]
fn expect_100_continue_is_handled() {
    let s = Server::memory();
    let addr = s.http_addr();
    let text = "x".repeat(5000);
    let body = json!({"chat": "expect", "text": text, "sender": "s"}).to_string();
    let head = format!(
        "POST /api/send HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );

    // like curl: headers first, then the body (after a 100 Continue or a 1 s wait)
    let mut conn = HttpConn::connect(addr);
    conn.write_raw(head.as_bytes());
    thread::sleep(Duration::from_millis(200));
    conn.write_raw(body.as_bytes());
    let t1 = send_time_of(
        &conn.read_response(),
        "send with Expect: 100-continue (body after a pause)",
    );
    let r = conn.request("GET", "/ping", &[], b"");
    assert_eq!(
        r.status,
        200,
        "ping on the same connection after the Expect request: {}",
        r.describe()
    );

    // headers and body in one write
    let mut conn = HttpConn::connect(addr);
    let mut req = head.clone().into_bytes();
    req.extend_from_slice(body.as_bytes());
    conn.write_raw(&req);
    let t2 = send_time_of(
        &conn.read_response(),
        "send with Expect: 100-continue (body at once)",
    );
    let r = conn.request("GET", "/ping", &[], b"");
    assert_eq!(
        r.status,
        200,
        "ping on the same connection after the Expect request: {}",
        r.describe()
    );

    let page = pull_page(addr, "expect", 0, 10, true);
    assert_eq!(page.times(), vec![t1, t2]);
    assert!(
        page.messages.iter().all(|m| m.text == text),
        "5000-byte texts round-trip"
    );
}

#[test]
fn expect_100_continue_gets_interim_then_final() {
    let s = Server::memory();
    let addr = s.http_addr();
    let body = send_body("expect", "s", "waited for 100 Continue");
    let head = format!(
        "POST /api/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    let mut c = HttpConn::connect(addr);
    c.write_raw(head.as_bytes());
    // The body is not sent until the interim response arrives.
    c.set_read_timeout(Duration::from_secs(3));
    let status = c.read_line("interim response");
    assert_eq!(
        status.trim_end(),
        "HTTP/1.1 100 Continue",
        "the head with Expect: 100-continue must get `HTTP/1.1 100 Continue` before the body is sent"
    );
    let blank = c.read_line("end of the interim response");
    assert_eq!(
        blank, "\r\n",
        "100 Continue must have no header fields here"
    );
    c.set_read_timeout(IO_TIMEOUT);
    c.write_raw(body.as_bytes());
    let r = c.read_response();
    let t = send_time_of(&r, "send after 100 Continue");
    let page = pull_page(addr, "expect", 0, 10, true);
    assert_eq!(page.times(), vec![t]);
    assert_alive(addr, "after Expect: 100-continue");
}

#[test]
fn expect_100_continue_with_oversized_length_is_413_without_100() {
    let s = Server::memory();
    let addr = s.http_addr();
    let mut c = HttpConn::connect(addr);
    c.write_raw(
        b"POST /api/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n\r\n",
    );
    c.set_read_timeout(Duration::from_secs(3));
    let first = c.read_line("first response line");
    assert!(
        first.starts_with("HTTP/1.1 413"),
        "a body over the limit with Expect: 100-continue must be answered 413 at once (no 100 Continue), got {first:?}"
    );
    // the rest of the 413 response, then close
    let mut rest = Vec::new();
    loop {
        let line = c.read_line("413 headers");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        rest.push(line);
    }
    assert!(
        rest.iter()
            .any(|h| h.to_ascii_lowercase().starts_with("connection: close")),
        "413 must close the connection: {rest:?}"
    );
    assert_alive(addr, "after Expect with an oversized Content-Length");
}

const FORM_CT: &[(&str, &str)] = &[("Content-Type", "application/x-www-form-urlencoded")];

/// The texts of a chat, oldest first.
fn texts_of(addr: std::net::SocketAddr, chat: &str) -> Vec<String> {
    let r = pull_json(addr, json!({"chat": chat, "reverse": true, "limit": 100}));
    assert_eq!(r.status, 200, "pull {chat}: {}", r.describe());
    r.json()["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["text"].as_str().expect("text").to_string())
        .collect()
}

#[test]
fn send_by_query_string_and_form_body() {
    let s = Server::memory();
    let addr = s.http_addr();
    let by_query = request(
        addr,
        "POST",
        "/api/send?chat=forms&text=via+query%21%20%F0%9F%98%80&sender=bob&other=ignored",
        &[],
        b"",
    );
    send_time_of(&by_query, "send by query string");
    let by_form = request(
        addr,
        "POST",
        "/api/send",
        FORM_CT,
        b"chat=forms&text=a%26b+c%3Dd&sender=bob",
    );
    send_time_of(&by_form, "send by form body");
    let with_charset = request(
        addr,
        "POST",
        "/api/send",
        &[(
            "Content-Type",
            "Application/X-WWW-Form-URLEncoded; charset=UTF-8",
        )],
        b"sender=bob&text=charset&chat=forms",
    );
    send_time_of(&with_charset, "form body with a charset parameter");
    // `curl -d '{...}'` labels a JSON body as a form: still JSON.
    let curl_default = request(
        addr,
        "POST",
        "/api/send",
        FORM_CT,
        br#" {"chat":"forms","text":"json labelled form","sender":"bob"}"#,
    );
    send_time_of(&curl_default, "JSON body labelled as a form");
    assert_eq!(
        texts_of(addr, "forms"),
        ["via query! 😀", "a&b c=d", "charset", "json labelled form"]
    );
    // Two-person rooms and idempotency keys work the same in a form.
    let key = "form-key-1";
    let body = format!("chat=b%3Aa&text=once&sender=a&idempotency_key={key}");
    let first = request(addr, "POST", "/api/send", FORM_CT, body.as_bytes());
    let t1 = send_time_of(&first, "first keyed form send");
    let again = request(
        addr,
        "POST",
        "/api/send",
        &[FORM_CT[0], ("Idempotency-Key", key)],
        body.as_bytes(),
    );
    assert_eq!(send_time_of(&again, "replayed form send"), t1);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(texts_of(addr, "a:b"), ["once"]);
}

#[test]
fn send_forms_are_validated_and_never_mixed() {
    let s = Server::memory();
    let addr = s.http_addr();
    let message_of = |r: &Response| {
        r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    for (ctx, path, headers, body, says) in [
        (
            "JSON body + query fields",
            "/api/send?chat=mix",
            JSON_CT,
            &br#"{"chat":"mix","text":"t","sender":"s"}"#[..],
            "not both",
        ),
        (
            "form body + query fields",
            "/api/send?sender=s",
            FORM_CT,
            b"chat=mix&text=t",
            "not both",
        ),
        (
            "query without text",
            "/api/send?chat=mix&sender=s",
            &[],
            b"",
            "text",
        ),
        (
            "form without chat",
            "/api/send",
            FORM_CT,
            b"text=t&sender=s",
            "chat",
        ),
        (
            "field twice",
            "/api/send?chat=mix&text=a&text=b&sender=s",
            &[],
            b"",
            "twice",
        ),
        (
            "bad escape",
            "/api/send",
            FORM_CT,
            b"chat=mix&text=%zz&sender=s",
            "percent",
        ),
        (
            "not UTF-8",
            "/api/send?chat=mix&text=%FF&sender=s",
            &[],
            b"",
            "UTF-8",
        ),
        (
            "bad idempotency key",
            "/api/send?chat=mix&text=t&sender=s&idempotency_key=",
            &[],
            b"",
            "key",
        ),
        (
            "nothing at all",
            "/api/send?unrelated=1",
            &[],
            b"",
            "required",
        ),
    ] {
        let r = request(addr, "POST", path, headers, body);
        assert_error(&r, 400, ctx);
        assert!(message_of(&r).contains(says), "{ctx}: {}", r.describe());
    }
    let oversized = format!("chat=mix&sender=s&text={}", "x".repeat(64 * 1024 + 1));
    let r = request(addr, "POST", "/api/send", FORM_CT, oversized.as_bytes());
    assert_error(&r, 400, "form text over 64 KiB");
    assert!(
        texts_of(addr, "mix").is_empty(),
        "a refused send stored something"
    );
    // Query parameters that name no send field do not count as mixing.
    let r = request(
        addr,
        "POST",
        "/api/send?utm_source=x",
        JSON_CT,
        br#"{"chat":"mix","text":"t","sender":"s"}"#,
    );
    send_time_of(&r, "JSON body with an unrelated query parameter");
}

/// The default listen address is the IPv6 wildcard, dual-stack: one server
/// answers over IPv4 and over IPv6 (here on port 0 instead of 8080).
#[test]
fn default_style_address_is_dual_stack() {
    let s = Server::start("all", &["--http-addr", "[::]:0"], &[]);
    let port = s.http_addr().port();
    if s.stderr().contains("no IPv6 on this host") {
        // The documented fallback: IPv4 only, and the log says so.
        assert!(s.http_addr().is_ipv4(), "fallback listens on 0.0.0.0");
    } else {
        assert!(s.http_addr().is_ipv6(), "listening on {}", s.http_addr());
        let r = request(
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            "GET",
            "/ping",
            &[],
            b"",
        );
        assert_eq!(r.status, 200, "GET /ping over ::1: {}", r.describe());
    }
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let r = request(v4, "GET", "/ping", &[], b"");
    assert_eq!(r.status, 200, "GET /ping over 127.0.0.1: {}", r.describe());
    send_ok(v4, "dual", "v4", "over IPv4");
}

/// What `curl` sends when a user follows their instinct: `-d` labels any
/// body a form. The answer says what the body was taken for and what to
/// send instead, rather than quoting a rule about a field the user never
/// saw (`chat must not be empty`).
fn curl(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl runs (apt-get install curl)");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("curl {args:?}: not JSON ({e}): {:?}", out.stdout))
}

#[test]
fn bodies_of_the_wrong_kind_get_messages_that_say_what_to_send() {
    let s = Server::memory();
    let base = format!("http://{}", s.http_addr());
    let send = format!("{base}/api/send");
    let pull = format!("{base}/api/pull");
    let message = |v: &serde_json::Value| v["error"]["message"].as_str().unwrap_or("").to_string();

    let m = message(&curl(&["-d", "notjson", &send]));
    assert!(m.contains("sent as a form"), "{m}");
    assert!(
        m.contains(r#"{"chat":"a:b","text":"hi","sender":"a"}"#),
        "{m}"
    );
    assert!(m.contains("chat=a:b&text=hi&sender=a"), "{m}");
    let json_ct = "Content-Type: application/json";
    let m = message(&curl(&["-H", json_ct, "-d", "notjson", &send]));
    assert!(m.starts_with("the body is not a JSON object"), "{m}");
    assert!(
        m.contains(r#"{"chat":"a:b","text":"hi","sender":"a"}"#),
        "{m}"
    );
    let m = message(&curl(&["-H", json_ct, "-d", r#"["a:b","hi"]"#, &send]));
    assert!(m.starts_with("the body is a JSON array"), "{m}");

    let m = message(&curl(&["-X", "GET", "-d", "chat=a:b", &pull]));
    assert!(
        m.contains("sent as a form") && m.contains("a pull reads no form"),
        "{m}"
    );
    assert!(m.contains("curl -G -d chat=a:b"), "{m}");
    let m = message(&curl(&[
        "-X", "GET", "-H", json_ct, "-d", "chat=a:b", &pull,
    ]));
    assert!(m.starts_with("the body is not a JSON object"), "{m}");
    // What the messages advise works.
    let sent = curl(&["-d", "chat=a:b&text=hi&sender=a", &send]);
    assert!(sent["send_time"].is_i64(), "{sent}");
    let page = curl(&["-G", "-d", "chat=a:b", &pull]);
    assert_eq!(page["messages"][0]["text"], "hi", "{page}");
}
