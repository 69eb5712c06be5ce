//! `GET /metrics` on the gateway and on `--metrics-addr`, over real sockets:
//! the output passes `promtool check metrics`, counters move by exactly the
//! traffic sent, histograms are cumulative and consistent, gauges return to
//! 0, and per-endpoint series follow discovery.

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use common::*;
use serde_json::json;

const HISTOGRAMS: [&str; 3] = [
    "im_http_request_duration_seconds",
    "im_rpc_call_duration_seconds",
    "im_rpc_server_request_duration_seconds",
];

/// Every histogram series: buckets cumulative (non-decreasing in the order
/// printed, `le` ascending) and `_count` equal to the `+Inf` bucket.
fn assert_histograms_consistent(s: &Scrape) {
    for name in HISTOGRAMS {
        let buckets = s.family(&format!("{name}_bucket"));
        assert!(!buckets.is_empty(), "{name}: no buckets in\n{}", s.text);
        let counts = s.family(&format!("{name}_count"));
        assert!(!counts.is_empty(), "{name}: no _count");
        for (labels, count) in counts {
            // `{route="send"}` -> the buckets' prefix `{route="send",le=`.
            let prefix = format!("{},le=", labels.trim_end_matches('}'));
            let series: Vec<(&str, f64)> = buckets
                .iter()
                .filter_map(|(l, v)| l.strip_prefix(&prefix).map(|le| (le, *v)))
                .collect();
            assert!(series.len() > 2, "{name}{labels}: buckets {series:?}");
            assert!(
                series.windows(2).all(|w| w[0].1 <= w[1].1),
                "{name}{labels}: buckets not cumulative: {series:?}"
            );
            let (le, inf) = series[series.len() - 1];
            assert_eq!(le, "\"+Inf\"}", "{name}{labels}: last bucket");
            assert_eq!(
                inf, count,
                "{name}{labels}: _count must equal the +Inf bucket"
            );
            let key = format!("{name}_sum{labels}");
            let sum = s.samples.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
            assert!(
                sum.is_some_and(|v| v >= 0.0),
                "{name}{labels}: _sum {sum:?}"
            );
        }
    }
}

fn requests(s: &Scrape, route: &str, code: &str) -> f64 {
    s.value(
        "im_http_requests_total",
        &[("route", route), ("code", code)],
    )
}

fn histogram_count(s: &Scrape, name: &str, label: (&str, &str)) -> f64 {
    s.value(&format!("{name}_count"), &[label])
}

/// The sum of a per-peer family over every peer (one Redis node here).
fn over_peers(s: &Scrape, name: &str) -> f64 {
    s.family(name).iter().map(|(_, v)| v).sum()
}

#[test]
fn scrapes_pass_promtool_and_counters_move_by_exactly_the_traffic() {
    let redis = Redis::start();
    let url = redis.url();
    let rpc = Server::rpc(&["--redis", &url, "--metrics-addr", "127.0.0.1:0"]);
    let gateway = Server::gateway(rpc.rpc_addr(), &[]);
    let (http, rpc_metrics) = (gateway.http_addr(), rpc.metrics_addr());
    // One request first, so every series the traffic touches exists.
    send_ok(http, "metrics-room", "a", "warm-up");

    let before = scrape(http);
    let rpc_before = scrape(rpc_metrics);
    for i in 0..7 {
        send_ok(http, "metrics-room", "a", &format!("m{i}"));
    }
    for _ in 0..3 {
        let r = pull_json(http, json!({"chat": "metrics-room", "limit": 2}));
        assert_eq!(r.status, 200, "{}", r.describe());
    }
    assert_error(&send_raw_body(http, b"{not json"), 400, "bad json");
    assert_error(
        &request(http, "GET", "/api/send", &[], b""),
        405,
        "GET send",
    );
    for path in ["/nope", "/api/pull/extra"] {
        assert_error(&request(http, "GET", path, &[], b""), 404, path);
    }
    assert_eq!(request(http, "GET", "/ping", &[], b"").status, 200);
    let after = scrape(http);
    let rpc_after = scrape(rpc_metrics);
    promtool_check(&after.text);
    promtool_check(&rpc_after.text);

    let moved =
        |route: &str, code: &str| requests(&after, route, code) - requests(&before, route, code);
    assert_eq!(moved("send", "200"), 7.0, "7 sends");
    assert_eq!(moved("pull", "200"), 3.0, "3 pulls");
    assert_eq!(moved("send", "400"), 1.0);
    assert_eq!(moved("send", "405"), 1.0);
    assert_eq!(moved("other", "404"), 2.0);
    assert_eq!(moved("ping", "200"), 1.0);
    // The first scrape was answered after it was rendered: counted in the second.
    assert_eq!(moved("metrics", "200"), 1.0);
    let total = |s: &Scrape| -> f64 {
        s.family("im_http_requests_total")
            .iter()
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(total(&after) - total(&before), 16.0, "nothing else counted");

    let hist = |s: &Scrape, name: &str, label| histogram_count(s, name, label);
    let http_latency = "im_http_request_duration_seconds";
    assert_eq!(
        hist(&after, http_latency, ("route", "send"))
            - hist(&before, http_latency, ("route", "send")),
        9.0,
        "7 stored, 1 invalid, 1 wrong method"
    );
    let rpc_latency = "im_rpc_call_duration_seconds";
    for (method, n) in [("send", 7.0), ("pull", 3.0)] {
        assert_eq!(
            hist(&after, rpc_latency, ("method", method))
                - hist(&before, rpc_latency, ("method", method)),
            n,
            "RPC calls of {method}: the invalid send never reached the RPC server"
        );
    }
    let endpoint = rpc.rpc_addr().to_string();
    let calls = |s: &Scrape, name: &str| s.value(name, &[("endpoint", &endpoint)]);
    assert_eq!(
        calls(&after, "im_rpc_calls_total") - calls(&before, "im_rpc_calls_total"),
        10.0
    );
    assert_eq!(calls(&after, "im_rpc_errors_total"), 0.0);
    assert_eq!(calls(&after, "im_rpc_timeouts_total"), 0.0);
    assert_eq!(calls(&after, "im_rpc_calls_in_flight"), 0.0);
    assert_histograms_consistent(&after);

    // The RPC server's own scrape: what it served, and its Redis commands.
    let served =
        |s: &Scrape, method: &str| s.value("im_rpc_server_requests_total", &[("method", method)]);
    assert_eq!(
        served(&rpc_after, "send") - served(&rpc_before, "send"),
        7.0
    );
    assert_eq!(
        served(&rpc_after, "pull") - served(&rpc_before, "pull"),
        3.0
    );
    // One client, one request at a time: each send is its own im_send batch.
    let redis_calls = over_peers(&rpc_after, "im_redis_calls_total")
        - over_peers(&rpc_before, "im_redis_calls_total");
    assert_eq!(redis_calls, 10.0, "7 im_send + 3 ranges");
    assert_eq!(over_peers(&rpc_after, "im_redis_errors_total"), 0.0);
    assert_eq!(over_peers(&rpc_after, "im_redis_calls_in_flight"), 0.0);
    assert_histograms_consistent(&rpc_after);
    for s in [&after, &rpc_after] {
        assert_eq!(
            s.get("im_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
            Some(1.0)
        );
        assert!(s.value("process_resident_memory_bytes", &[]) > 1e6, "RSS");
        assert!(s.value("process_open_fds", &[]) >= 3.0, "fds");
        assert!(s.value("process_cpu_seconds_total", &[]) >= 0.0);
        let start = s.value("process_start_time_seconds", &[]);
        let now = now_us() as f64 / 1e6;
        assert!(
            now - 120.0 < start && start <= now + 1.0,
            "start time {start} vs now {now}"
        );
    }
    // The RPC server's process figures are its own: its RSS is what
    // /proc says of it, within a page or two of growth between the reads.
    let pid = rpc.pid().expect("running");
    let rss = proc_status_bytes(pid, "VmRSS") as f64;
    let scraped = scrape(rpc_metrics).value("process_resident_memory_bytes", &[]);
    assert!(
        (scraped - rss).abs() < 4.0 * 1024.0 * 1024.0,
        "RSS {scraped} vs /proc {rss}"
    );
}

/// Gauges count what is in flight while Redis is stopped, and come back to
/// 0 once it answers and the load is over; the stall shows as timeouts.
#[test]
fn gauges_follow_a_stall_and_return_to_zero() {
    let redis = Redis::start();
    let backend_url = redis.url();
    let server = Server::start(
        "all",
        // The stall lasts the Redis timeout (80 % of this): long enough for
        // the scrapes below to see every tier hold the four sends at once.
        &["--redis", &backend_url, "--rpc-timeout-ms", "3000"],
        &[],
    );
    let http = server.http_addr();
    send_ok(http, "stall", "a", "before");
    let before = scrape(http);
    let redis_pid = redis.pid().expect("redis runs");
    send_signal(redis_pid, "STOP");
    let senders: Vec<_> = (0..4)
        .map(|i| thread::spawn(move || send(http, "stall", "a", &format!("stalled {i}")).status))
        .collect();
    let rpc_endpoint = server.rpc_addr().to_string();
    // Each tier counts the sends when they reach it, so one scrape may see
    // the gateway hold four while the RPC server has three yet: wait until
    // a scrape sees them in every tier.
    wait_until(
        Duration::from_secs(5),
        "4 sends in flight in every tier",
        || {
            let s = scrape(http);
            // The scrape itself is in flight too.
            let all = s.value("im_http_requests_in_flight", &[]) >= 5.0
            && s.value("im_http_connections_open", &[]) >= 5.0
            && s.value("im_rpc_calls_in_flight", &[("endpoint", &rpc_endpoint)]) >= 4.0
            && s.value("im_rpc_server_requests_in_flight", &[]) >= 4.0
            // The stalled batch.
            && over_peers(&s, "im_redis_calls_in_flight") >= 1.0;
            all.then_some(())
        },
    );
    for sender in senders {
        assert_eq!(sender.join().expect("sender"), 503, "Redis timed out");
    }
    send_signal(redis_pid, "CONT");
    let after = wait_until(Duration::from_secs(5), "gauges back to 0", || {
        let s = scrape(http);
        let idle = s.value("im_http_requests_in_flight", &[]) == 1.0
            && s.value("im_http_connections_open", &[]) == 1.0
            && s.value("im_rpc_calls_in_flight", &[("endpoint", &rpc_endpoint)]) == 0.0
            && s.value("im_rpc_server_requests_in_flight", &[]) == 0.0
            && over_peers(&s, "im_redis_calls_in_flight") == 0.0;
        idle.then_some(s)
    });
    promtool_check(&after.text);
    for gauge in ["im_pulls_waiting", "im_streams_open"] {
        assert_eq!(after.get(gauge, &[]), Some(0.0), "{gauge}");
    }
    // The stalled batch(es) answered after their deadline: timeouts.
    let timeouts = over_peers(&after, "im_redis_timeouts_total")
        - over_peers(&before, "im_redis_timeouts_total");
    assert!((1.0..=4.0).contains(&timeouts), "redis timeouts {timeouts}");
    assert_eq!(
        requests(&after, "send", "503") - requests(&before, "send", "503"),
        4.0
    );
    assert_histograms_consistent(&after);
    send_ok(http, "stall", "a", "after");
}

/// Each RPC server the gateway knows has its series; one that leaves the
/// registry loses them.
#[test]
fn per_endpoint_series_follow_discovery() {
    let etcd = Etcd::start();
    let registry = etcd.registry("/im/metrics");
    let first = Server::rpc(&["--registry", &registry]);
    let mut second = Server::rpc(&["--registry", &registry]);
    let gateway = Server::start("gateway", &["--registry", &registry], &[]);
    let http = gateway.http_addr();
    let endpoints = [first.rpc_addr().to_string(), second.rpc_addr().to_string()];
    let has = |s: &Scrape, e: &str| s.get("im_rpc_calls_total", &[("endpoint", e)]).is_some();
    wait_until(Duration::from_secs(10), "both endpoints' series", || {
        let s = scrape(http);
        endpoints.iter().all(|e| has(&s, e)).then_some(())
    });
    for i in 0..20 {
        send_ok(http, "discovered", "a", &format!("m{i}"));
    }
    let s = scrape(http);
    promtool_check(&s.text);
    let per: Vec<f64> = endpoints
        .iter()
        .map(|e| s.value("im_rpc_calls_total", &[("endpoint", e)]))
        .collect();
    assert!(per.iter().sum::<f64>() >= 20.0, "{per:?}");
    // Deregistered on SIGTERM: its series go with its client.
    second.signal("TERM");
    assert!(
        second.wait_exit(Duration::from_secs(15)).is_some(),
        "rpc exits"
    );
    wait_until(
        Duration::from_secs(10),
        "the removed endpoint's series gone",
        || {
            let s = scrape(http);
            (!has(&s, &endpoints[1]) && has(&s, &endpoints[0])).then_some(())
        },
    );
    send_ok(http, "discovered", "a", "after");
    let s = scrape(http);
    for family in [
        "im_rpc_calls_total",
        "im_rpc_errors_total",
        "im_rpc_timeouts_total",
        "im_rpc_calls_in_flight",
    ] {
        let series = s.family(family);
        assert_eq!(series.len(), 1, "{family}: {series:?}");
        assert!(series[0].0.contains(&endpoints[0]), "{family}: {series:?}");
    }
}

/// `/metrics` answers without a token when authentication is on; the
/// `--metrics-addr` listener serves nothing else.
#[test]
fn metrics_need_no_token_and_the_metrics_listener_serves_only_metrics() {
    let (_dir, secret) = temp_file("metrics-auth", "0123456789abcdef0123456789abcdef-metrics");
    let server = Server::start(
        "all",
        &[
            "--auth-jwt-secret-file",
            &secret,
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let http = server.http_addr();
    assert_eq!(send(http, "room", "a", "no token").status, 401);
    let s = scrape(http);
    assert_eq!(requests(&s, "send", "401"), 1.0);
    let metrics: SocketAddr = server.metrics_addr();
    let own = scrape(metrics);
    promtool_check(&own.text);
    assert_eq!(
        requests(&own, "send", "401"),
        1.0,
        "one process, one set of counters"
    );
    assert_error(
        &request(metrics, "GET", "/api/pull?chat=x", &[], b""),
        404,
        "pull on metrics port",
    );
    assert_error(
        &request(metrics, "POST", "/metrics", &[], b""),
        405,
        "POST /metrics",
    );
    assert_error(
        &request(http, "POST", "/metrics", &[], b""),
        405,
        "POST /metrics on the gateway",
    );
    let mut conn = HttpConn::connect(http);
    conn.write_request("HEAD", "/metrics", &[], b"");
    let head = conn.read_head_response();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "HEAD has no body");
}

/// WebSocket connections and their subscriptions are gauges of the
/// gateway, back to 0 once the client has gone; edits and deletes are
/// counted under routes of their own.
#[test]
fn websocket_gauges_follow_connections_and_subscriptions() {
    let server = Server::memory();
    let http = server.http_addr();
    let sent = send_ok(http, "gauged", "a", "first");
    let gauges = |s: &Scrape| {
        (
            s.value("im_ws_connections_open", &[]),
            s.value("im_ws_subscriptions", &[]),
        )
    };
    let mut ws = WsClient::connect(http, &[]);
    let (reply, _) = ws.call(json!({"id": 1, "op": "subscribe", "chat": "gauged"}));
    assert_eq!(reply["ok"], true, "{reply}");
    let during = scrape(http);
    promtool_check(&during.text);
    assert_eq!(gauges(&during), (1.0, 1.0));
    drop(ws);
    wait_until(Duration::from_secs(5), "WebSocket gauges back to 0", || {
        (gauges(&scrape(http)) == (0.0, 0.0)).then_some(())
    });
    let before = scrape(http);
    let edit = json!({"chat": "gauged", "send_time": sent, "text": "edited"});
    let json = [("Content-Type", "application/json")];
    let r = request(
        http,
        "POST",
        "/api/edit",
        &json,
        edit.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    let after = scrape(http);
    assert_eq!(
        requests(&after, "edit", "200") - requests(&before, "edit", "200"),
        1.0
    );
}
