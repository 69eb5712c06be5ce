//! The standard `process_*` metrics, read from `/proc` at scrape time:
//! CPU seconds and start time from `/proc/self/stat`, memory from
//! `/proc/self/status`, open descriptors from `/proc/self/fd`, their limit
//! from `/proc/self/limits`. The parsers are pure; a file that cannot be
//! read (not Linux) leaves its series out.

use super::text::Writer;

/// `AT_CLKTCK` in the auxiliary vector: the unit of the times in `stat`.
const AT_CLKTCK: u64 = 17;
/// What nearly every Linux uses, if the auxiliary vector cannot be read.
const DEFAULT_CLOCK_TICKS: u64 = 100;

/// Times from `/proc/<pid>/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatTimes {
    pub user: u64,
    pub system: u64,
    /// Since boot.
    pub start: u64,
}

/// Fields 14 (utime), 15 (stime) and 22 (starttime) of a `stat` line. The
/// command name (field 2) may hold spaces and parentheses: fields are
/// counted from after its last `)`.
pub fn parse_stat(stat: &str) -> Option<StatTimes> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state).
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse().ok();
    Some(StatTimes {
        user: field(14)?,
        system: field(15)?,
        start: field(22)?,
    })
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS:   1234 kB`), in bytes.
pub fn parse_status_bytes(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let kb: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `btime` of `/proc/stat`: boot time, seconds since the epoch.
pub fn parse_boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of `Max open files` in `/proc/<pid>/limits`.
pub fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `AT_CLKTCK` from a 64-bit auxiliary vector (pairs of native-endian u64).
pub fn parse_clock_ticks(auxv: &[u8]) -> Option<u64> {
    auxv.chunks_exact(16).find_map(|pair| {
        let word = |b: &[u8]| b.try_into().ok().map(u64::from_ne_bytes);
        (word(&pair[..8])? == AT_CLKTCK).then(|| word(&pair[8..]))?
    })
}

fn clock_ticks() -> u64 {
    std::fs::read("/proc/self/auxv")
        .ok()
        .and_then(|auxv| parse_clock_ticks(&auxv))
        .filter(|&t| t > 0)
        .unwrap_or(DEFAULT_CLOCK_TICKS)
}

/// Appends the `process_*` series that can be read.
pub fn render(out: &mut Writer) {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let ticks = clock_ticks() as f64;
    let times = read("/proc/self/stat").and_then(|s| parse_stat(&s));
    let status = read("/proc/self/status").unwrap_or_default();
    let boot = read("/proc/stat").and_then(|s| parse_boot_time(&s));
    let fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count());
    let max_fds = read("/proc/self/limits").and_then(|l| parse_max_fds(&l));
    let mut series: Vec<(&str, &str, &str, f64)> = Vec::new();
    if let Some(t) = times {
        series.push((
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (t.user + t.system) as f64 / ticks,
        ));
        if let Some(boot) = boot {
            series.push((
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                boot as f64 + t.start as f64 / ticks,
            ));
        }
    }
    for (field, name, help) in [
        (
            "VmRSS",
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        ),
        (
            "VmSize",
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
        ),
    ] {
        if let Some(bytes) = parse_status_bytes(&status, field) {
            series.push((name, "gauge", help, bytes as f64));
        }
    }
    if let Some(fds) = fds {
        series.push((
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds as f64,
        ));
    }
    if let Some(max) = max_fds {
        series.push((
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max as f64,
        ));
    }
    for (name, kind, help, value) in series {
        out.header(name, kind, help);
        out.sample(name, &[], value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "4242 (im (s) x) S 1 4242 4242 0 -1 4194560 1160 0 0 0 \
                    731 205 0 0 20 0 3 0 98765 123456789 2345 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(StatTimes {
                user: 731,
                system: 205,
                start: 98765
            })
        );
        assert_eq!(parse_stat("4242 (im) S 1 2"), None);
    }

    #[test]
    fn status_limits_boot_time_and_auxv_parse() {
        let status = "Name:\tim-server\nVmRSSX:\t1 kB\nVmSize:\t  20480 kB\nVmRSS:\t    5120 kB\n";
        assert_eq!(parse_status_bytes(status, "VmRSS"), Some(5120 * 1024));
        assert_eq!(parse_status_bytes(status, "VmSize"), Some(20480 * 1024));
        assert_eq!(parse_status_bytes(status, "VmHWM"), None);
        assert_eq!(
            parse_boot_time("cpu 1 2\nbtime 1795800000\nprocesses 9\n"),
            Some(1_795_800_000)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        let mut auxv = Vec::new();
        for (key, value) in [(6u64, 4096u64), (17, 250), (0, 0)] {
            auxv.extend(key.to_ne_bytes());
            auxv.extend(value.to_ne_bytes());
        }
        assert_eq!(parse_clock_ticks(&auxv), Some(250));
        assert_eq!(parse_clock_ticks(&auxv[..16]), None);
    }

    #[test]
    fn this_process_reads_its_own_figures() {
        let mut w = Writer::default();
        render(&mut w);
        let text = w.finish();
        for name in [
            "process_cpu_seconds_total ",
            "process_start_time_seconds ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
