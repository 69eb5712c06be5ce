//! The OpenAPI document (`openapi.json`) and the chat page (`web/chat.html`):
//! served verbatim, and the document names every route, method, status and
//! error code the gateway has. Routes, statuses and codes are read from the
//! gateway's own source, so a new route or error without documentation
//! fails here. (Schemathesis, run by .ci/test, checks the rest against the
//! running server.)

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::Value;

const OPENAPI: &[u8] = include_bytes!("../openapi.json");
const CHAT_HTML: &[u8] = include_bytes!("../web/chat.html");
const ROUTES_SRC: &str = include_str!("../src/gateway/routes.rs");
const ERRORS_SRC: &str = include_str!("../src/gateway/error.rs");

fn document() -> Value {
    serde_json::from_slice(OPENAPI).expect("openapi.json is JSON")
}

/// Every `b"/..."` literal in the gateway's route table: its paths.
fn routed_paths() -> BTreeSet<String> {
    ROUTES_SRC
        .split("b\"/")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(path, _)| format!("/{path}")))
        .collect()
}

/// The string literals in the body of `fn name` of error.rs.
fn literals_in_fn(name: &str) -> Vec<String> {
    let body = ERRORS_SRC
        .split(&format!("fn {name}("))
        .nth(1)
        .and_then(|s| s.split("\n    }\n").next())
        .unwrap_or_else(|| panic!("error.rs has fn {name}"));
    body.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn served_document_is_the_file_byte_for_byte() {
    let s = Server::memory();
    let r = request(s.http_addr(), "GET", "/openapi.json", &[], b"");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(
        r.body == OPENAPI,
        "the served document differs from openapi.json"
    );
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let head = request(s.http_addr(), "HEAD", "/openapi.json", &[], b"");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(OPENAPI.len().to_string().as_str())
    );
    assert!(head.body.is_empty());
}

#[test]
fn every_route_and_its_methods_are_documented() {
    let doc = document();
    let paths = doc["paths"].as_object().expect("paths");
    let routed = routed_paths();
    for must in ["/", "/ping", "/api/send", "/api/pull", "/openapi.json"] {
        assert!(
            routed.contains(must),
            "route scan missed {must}: {routed:?}"
        );
    }
    let s = Server::memory();
    for path in &routed {
        let documented = paths
            .get(path)
            .unwrap_or_else(|| panic!("route {path} is not in openapi.json"));
        let methods: BTreeSet<String> = documented
            .as_object()
            .expect("path item")
            .keys()
            .filter(|k| !matches!(k.as_str(), "parameters" | "summary" | "description"))
            .map(|k| k.to_uppercase())
            .collect();
        let r = request(s.http_addr(), "DELETE", path, &[], b"");
        assert_error(&r, 405, &format!("DELETE {path}"));
        let allowed: BTreeSet<String> = r
            .header("allow")
            .unwrap_or_else(|| panic!("405 without Allow for {path}"))
            .split(',')
            .map(|m| m.trim().to_string())
            .collect();
        assert_eq!(allowed, methods, "methods of {path}: Allow vs openapi.json");
    }
}

#[test]
fn every_status_and_error_code_is_documented() {
    let doc = document();
    let mut statuses = BTreeSet::new();
    for item in doc["paths"].as_object().expect("paths").values() {
        for op in item.as_object().expect("path item").values() {
            for code in op["responses"].as_object().expect("responses").keys() {
                statuses.insert(code.clone());
            }
        }
    }
    let status_fn = ERRORS_SRC
        .split("pub fn status(")
        .nth(1)
        .and_then(|s| s.split("\n    }\n").next())
        .expect("error.rs has fn status");
    for arm in status_fn.split("=> ").skip(1) {
        let code: String = arm.chars().take_while(char::is_ascii_digit).collect();
        // 404 (unknown path) and 405 (a method a path lacks) belong to no
        // operation: info.description states them.
        if code.is_empty() || code == "404" || code == "405" {
            continue;
        }
        assert!(
            statuses.contains(&code),
            "status {code} is in no operation's responses"
        );
    }
    let enum_values =
        &doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"];
    let documented: BTreeSet<&str> = enum_values
        .as_array()
        .expect("error code enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let codes = literals_in_fn("code");
    assert!(codes.len() >= 15, "scan of fn code found {codes:?}");
    for code in &codes {
        assert!(
            documented.contains(code.as_str()),
            "error code {code} is not documented"
        );
    }
}

#[test]
fn chat_page_is_served_with_its_policy() {
    let s = Server::memory();
    let r = request(s.http_addr(), "GET", "/", &[], b"");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let csp = r.header("content-security-policy").expect("CSP header");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    assert!(
        r.body == CHAT_HTML,
        "the served page differs from web/chat.html"
    );
    let head = request(s.http_addr(), "HEAD", "/", &[], b"");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let post = request(s.http_addr(), "POST", "/", &[], b"");
    assert_error(&post, 405, "POST /");
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    // Nothing on the page is fetched from elsewhere.
    let page = String::from_utf8_lossy(CHAT_HTML);
    for external in ["http://", "https://", "//cdn", "src=\"//"] {
        assert!(!page.contains(external), "chat.html refers to {external}");
    }
}
