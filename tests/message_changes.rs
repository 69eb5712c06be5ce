//! Who may edit and delete a message, with authentication on, on every
//! store (issue 21): the sender may edit and delete, a token with
//! `"admin": true` may delete (not edit), anyone else gets 403
//! `forbidden`; a repeated delete answers the same, to whoever could have
//! made it. Also: a rolling upgrade's old RPC server (its library loaded
//! over the new one) leaves edits working.

mod common;

use std::net::SocketAddr;

use common::*;
use im_server::auth::jwt;
use serde_json::{Value, json};

const SECRET: &str = "an HS256 secret of at least 32 bytes, for tests";

fn with_auth(make: fn(&[&str]) -> Backend) -> (Backend, TempDir) {
    let (dir, path) = temp_file("changes", &format!("{SECRET}\n"));
    (make(&["--auth-jwt-secret-file", &path]), dir)
}

fn token(sub: &str, admin: Value) -> String {
    let exp = now_us() / 1_000_000 + 600;
    let t = jwt::mint(
        SECRET.as_bytes(),
        &json!({"sub": sub, "exp": exp, "admin": admin}),
    );
    format!("Bearer {t}")
}

fn post(addr: SocketAddr, path: &str, auth: &str, body: Value) -> Response {
    let headers = [
        ("Content-Type", "application/json"),
        ("Authorization", auth),
    ];
    request(addr, "POST", path, &headers, body.to_string().as_bytes())
}

fn check_rules(b: &Backend) {
    let addr = b.addr();
    let ann = token("ann", json!(false));
    let bob = token("bob", Value::Null);
    let admin = token("mod", json!(true));
    let fake_admin = token("eve", json!("true"));
    let send = |auth: &str, text: &str| {
        let r = post(
            addr,
            "/api/send",
            auth,
            json!({"chat": "room", "text": text}),
        );
        send_time_of(&r, "send")
    };
    let t1 = send(&ann, "one");
    let t2 = send(&ann, "two");
    let edit = |auth: &str, t: i64| {
        post(
            addr,
            "/api/edit",
            auth,
            json!({"chat": "room", "send_time": t, "text": "new"}),
        )
    };
    let delete = |auth: &str, t: i64| {
        post(
            addr,
            "/api/delete",
            auth,
            json!({"chat": "room", "send_time": t}),
        )
    };
    let forbidden = |r: Response, ctx: &str| {
        assert_error(&r, 403, ctx);
        assert_eq!(r.json()["error"]["code"], "forbidden", "{ctx}");
    };
    forbidden(edit(&bob, t1), "another user edits");
    forbidden(edit(&admin, t1), "an admin edits");
    forbidden(delete(&bob, t1), "another user deletes");
    forbidden(delete(&fake_admin, t1), "`admin` that is not `true`");
    let r = edit(&ann, t1);
    assert_eq!(r.status, 200, "the sender edits: {}", r.describe());
    let r = delete(&admin, t2);
    assert_eq!(r.status, 200, "an admin deletes: {}", r.describe());
    forbidden(delete(&bob, t2), "another user repeats a delete");
    assert_eq!(delete(&ann, t2).status, 200, "the sender repeats it");
    assert_eq!(delete(&admin, t2).status, 200, "the admin repeats it");
    let r = request(
        addr,
        "POST",
        "/api/delete",
        &[("Content-Type", "application/json")],
        json!({"chat": "room", "send_time": t1})
            .to_string()
            .as_bytes(),
    );
    assert_error(&r, 401, "no token");
    assert_eq!(delete(&ann, t1).status, 200, "the sender deletes");
    let r = request(
        addr,
        "GET",
        "/api/pull?chat=room",
        &[("Authorization", &ann)],
        b"",
    );
    assert_eq!(parse_page(&r, "pull").messages, vec![], "both gone");
}

#[test]
fn rules_on_the_memory_store() {
    let (b, _dir) = with_auth(Backend::memory_with);
    check_rules(&b);
}

#[test]
fn rules_on_redis() {
    let (b, _dir) = with_auth(Backend::redis_with);
    check_rules(&b);
}

#[test]
fn rules_on_a_cluster() {
    let (b, _dir) = with_auth(Backend::cluster_with);
    check_rules(&b);
}

/// A rolling upgrade: an older RPC server loads its own `im` library
/// (without `im_edit` or `im_send_stamped`) over the new one on each
/// connection. A send or an edit that then finds its function missing
/// loads the library again and runs.
#[test]
fn sends_and_edits_survive_an_older_library_loaded_over_them() {
    let b = Backend::redis();
    let addr = b.addr();
    let t = send_ok(addr, "up", "s", "v1");
    let redis = b.redis.as_ref().expect("redis");
    let old =
        "#!lua name=im\nredis.register_function('im_send', function(keys, args) return {} end)";
    let load_old = || {
        let loaded = redis.redis_cmd(&["FUNCTION", "LOAD", "REPLACE", old]);
        assert!(loaded.trim_end().ends_with("im"), "{loaded:?}");
    };
    load_old();
    let later = send_ok(addr, "up", "s", "v1, later");
    assert!(later > t);
    assert_eq!(
        pull_page(addr, "up", 0, 10, false).texts(),
        ["v1, later", "v1"]
    );
    load_old();
    let headers = [("Content-Type", "application/json")];
    let body = json!({"chat": "up", "send_time": t, "text": "v2"}).to_string();
    let r = request(addr, "POST", "/api/edit", &headers, body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        pull_page(addr, "up", 0, 10, false).texts(),
        ["v1, later", "v2"]
    );
}
