//! Prometheus metrics: scraping and linting (tests/metrics.rs).

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use super::*;

/// One scrape of `GET /metrics`: the text, and each sample by its series
/// (`name{label="value",...}`, labels in the order the server prints them).
pub struct Scrape {
    pub text: String,
    pub samples: Vec<(String, f64)>,
}

impl Scrape {
    /// The sample of `name` with exactly `labels`; 0 if absent (a counter
    /// that never moved may be left out).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sample of `name` with exactly `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let key = series_key(name, labels);
        self.samples
            .iter()
            .find(|(series, _)| *series == key)
            .map(|(_, v)| *v)
    }

    /// Every sample of `name` (any labels), as (labels text, value).
    pub fn family(&self, name: &str) -> Vec<(String, f64)> {
        self.samples
            .iter()
            .filter_map(|(series, v)| {
                let rest = series.strip_prefix(name)?;
                (rest.is_empty() || rest.starts_with('{')).then(|| (rest.to_string(), *v))
            })
            .collect()
    }
}

/// `name{a="x",b="y"}` as the server prints a series.
pub fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// Parses the text format's sample lines (comments skipped).
pub fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("malformed sample line {l:?}"));
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("malformed value in {l:?}")),
            };
            (series.to_string(), value)
        })
        .collect()
}

/// `GET /metrics` at `addr`: checks the status and the exposition format's
/// `Content-Type`, and parses the samples.
pub fn scrape(addr: SocketAddr) -> Scrape {
    let r = request(addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.describe());
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "GET /metrics content type"
    );
    let text = r.text();
    Scrape {
        samples: parse_metrics(&text),
        text,
    }
}

/// Runs `promtool check metrics` on `text`; panics with its complaints.
pub fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run promtool (Debian package prometheus): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- scrape ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
