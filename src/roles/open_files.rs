//! The descriptor budget: connection limits left at their defaults are
//! lowered until what they can take fits the open-file limit.

use crate::config::{Config, Role};

/// Raises the open-file limit as far as allowed, then fits the connection
/// limits to it ([`fit_open_files`]).
pub(super) fn raise_and_fit(config: &mut Config, shards: usize) {
    match crate::rlimit::raise_open_files_limit() {
        Some(files) => {
            crate::logging::info!("open-file limit {files}");
            fit_open_files(config, files, shards);
        }
        None => crate::logging::warning!("could not read the open-file limit"),
    }
}

/// Lowers the connection limits left at their defaults until the
/// descriptors they can take fit in `files` (issue 20, item 10: under
/// `nofile 1024` the defaults allowed 10,000 + 1,024 connections, and 1,100
/// idle RPC connections took every descriptor, so HTTP `/ping` went
/// unanswered). What is free after the fixed needs is split 3:1 between
/// HTTP and RPC connections in `all`; a limit that was given is kept, and
/// if the given ones still do not fit, a warning says so.
fn fit_open_files(config: &mut Config, files: u64, shards: usize) {
    let needed = descriptors_needed(config, shards);
    if needed <= files {
        return;
    }
    let files = usize::try_from(files).unwrap_or(usize::MAX);
    let (http_given, rpc_given) = (
        config.was_given("--max-connections"),
        config.was_given("--max-rpc-connections"),
    );
    let mut fixed = config.clone();
    fixed.max_connections = 0;
    fixed.max_rpc_connections = 0;
    let free = files.saturating_sub(descriptors_needed(&fixed, shards) as usize);
    let (http, rpc) = match config.role {
        Role::All => match (http_given, rpc_given) {
            (false, false) => (free - free / 4, free / 4),
            (true, _) => (0, free.saturating_sub(config.max_connections)),
            (false, true) => (free.saturating_sub(config.max_rpc_connections), 0),
        },
        Role::Gateway => (free, 0),
        Role::Rpc => (0, free),
    };
    // Never below a few: a limit of 0 would refuse everyone.
    if !http_given && config.role != Role::Rpc {
        config.max_connections = config.max_connections.min(http.max(16));
    }
    if !rpc_given && config.role != Role::Gateway {
        config.max_rpc_connections = config.max_rpc_connections.min(rpc.max(16));
    }
    if !http_given || !rpc_given {
        crate::logging::info!(
            "connection limits lowered to fit the open-file limit {files}: --max-connections {}, --max-rpc-connections {} (raise `ulimit -n` for more)",
            config.max_connections,
            config.max_rpc_connections
        );
    }
    let needed = descriptors_needed(config, shards);
    if needed as usize > files {
        crate::logging::warning!(
            "the connection limits can take {needed} descriptors, over the open-file limit {files}: lower --max-connections / --max-rpc-connections or raise `ulimit -n` (see docs/operations.md, Descriptor budget)"
        );
    }
}

/// Descriptors the configured limits allow this process to hold at once:
/// the connection limits of the roles it runs, every shard's pooled
/// connections, and a margin for listeners, epoll and the runtime's own.
fn descriptors_needed(config: &Config, shards: usize) -> u64 {
    let (gateway, rpc) = match config.role {
        Role::All => (true, true),
        Role::Gateway => (true, false),
        Role::Rpc => (false, true),
    };
    let mut needed = 64 + 4 * shards;
    if gateway {
        needed += config.max_connections + shards * config.rpc_connections;
    }
    if rpc {
        needed += config.max_rpc_connections;
        if config.redis_url.is_some() {
            needed += shards * config.redis_connections;
        }
    }
    needed as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Parsed;

    fn config(args: &[&str]) -> Config {
        match Config::parse(args.iter().map(|s| s.to_string()), |_| None) {
            Ok(Parsed::Run(config)) => *config,
            _ => panic!("{args:?} should parse"),
        }
    }

    #[test]
    fn descriptor_budget_counts_the_limits_of_the_roles_run() {
        let limits = ["--max-connections", "400", "--max-rpc-connections", "512"];
        let all = config(&limits);
        // 400 HTTP + 2 gateway→RPC + 512 RPC + 64 + 2 × 4
        assert_eq!(descriptors_needed(&all, 2), 986);
        let mut gateway_args = vec!["gateway", "--rpc", "h:1"];
        gateway_args.extend(limits);
        assert_eq!(descriptors_needed(&config(&gateway_args), 2), 400 + 2 + 72);
        let mut rpc_args = vec!["rpc", "--redis", "redis://h", "--redis-connections", "3"];
        rpc_args.extend(limits);
        assert_eq!(descriptors_needed(&config(&rpc_args), 2), 512 + 6 + 72);
    }

    #[test]
    fn default_connection_limits_are_lowered_to_fit_the_open_file_limit() {
        // Under 1024 files, `all` with two shards: 1024 - 74 fixed = 950
        // free, split 3:1.
        let mut all = config(&[]);
        fit_open_files(&mut all, 1024, 2);
        assert_eq!((all.max_connections, all.max_rpc_connections), (713, 237));
        assert!(descriptors_needed(&all, 2) <= 1024);
        // A given limit is kept; the other takes what is left.
        let mut given = config(&["--max-rpc-connections", "100"]);
        fit_open_files(&mut given, 1024, 2);
        assert_eq!(
            (given.max_connections, given.max_rpc_connections),
            (850, 100)
        );
        let mut both = config(&["--max-connections", "5000", "--max-rpc-connections", "100"]);
        fit_open_files(&mut both, 1024, 2);
        assert_eq!(both.max_connections, 5000, "given, even if it does not fit");
        // Room enough: nothing changes.
        let mut roomy = config(&[]);
        fit_open_files(&mut roomy, 20_000, 2);
        assert_eq!(roomy.max_connections, 10_000);
        let mut gateway = config(&["gateway", "--rpc", "h:1"]);
        fit_open_files(&mut gateway, 1024, 2);
        assert_eq!(gateway.max_connections, 1024 - 74);
    }
}
