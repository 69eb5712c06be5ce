//! The Prometheus text exposition format, version 0.0.4: `# HELP` and
//! `# TYPE` lines, then one `name{label="value",...} value` line per
//! sample. Pure: it only appends to a string.

use std::fmt::Write as _;

#[derive(Default)]
pub struct Writer {
    out: String,
}

impl Writer {
    pub fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        self.labels(labels);
        self.out.push(' ');
        self.value(value);
        self.out.push('\n');
    }

    /// A histogram's series: `cumulative` holds one count per bound in
    /// `bounds` and then the `+Inf` count, which is also `_count`.
    pub fn histogram(
        &mut self,
        name: &str,
        label: (&str, &str),
        bounds: &[&str],
        cumulative: &[u64],
        sum: f64,
    ) {
        let bucket = format!("{name}_bucket");
        for (le, count) in bounds.iter().chain(&["+Inf"]).zip(cumulative) {
            self.sample(&bucket, &[label, ("le", le)], *count as f64);
        }
        self.sample(&format!("{name}_sum"), &[label], sum);
        let count = cumulative.last().copied().unwrap_or(0);
        self.sample(&format!("{name}_count"), &[label], count as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }

    fn labels(&mut self, labels: &[(&str, &str)]) {
        if labels.is_empty() {
            return;
        }
        self.out.push('{');
        for (i, (name, value)) in labels.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(name);
            self.out.push_str("=\"");
            for c in value.chars() {
                match c {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }

    /// Integers print as integers; `Display` of an `f64` never uses an
    /// exponent, which the format accepts either way.
    fn value(&mut self, value: f64) {
        if value.is_nan() {
            self.out.push_str("NaN");
        } else if value.fract() == 0.0 && value.abs() < 1e15 {
            let _ = write!(self.out, "{}", value as i64);
        } else {
            let _ = write!(self.out, "{value}");
        }
    }
}

/// HELP text escapes backslash and newline.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_labels_and_histograms_are_formatted_as_prometheus_reads_them() {
        let mut w = Writer::default();
        w.header("im_x_total", "counter", "An x.\nTwo lines \\ here.");
        w.sample("im_x_total", &[], 3.0);
        w.sample("im_x_total", &[("a", "q\"b\\c\nd"), ("b", "2")], 0.25);
        w.histogram(
            "im_t_seconds",
            ("route", "send"),
            &["0.1", "1"],
            &[1, 3, 4],
            2.5,
        );
        assert_eq!(
            w.finish(),
            "# HELP im_x_total An x.\\nTwo lines \\\\ here.\n\
             # TYPE im_x_total counter\n\
             im_x_total 3\n\
             im_x_total{a=\"q\\\"b\\\\c\\nd\",b=\"2\"} 0.25\n\
             im_t_seconds_bucket{route=\"send\",le=\"0.1\"} 1\n\
             im_t_seconds_bucket{route=\"send\",le=\"1\"} 3\n\
             im_t_seconds_bucket{route=\"send\",le=\"+Inf\"} 4\n\
             im_t_seconds_sum{route=\"send\"} 2.5\n\
             im_t_seconds_count{route=\"send\"} 4\n"
        );
    }
}
