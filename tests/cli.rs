//! The command line of the real binary: `--help` (usage, roles, every
//! option's help whole), `--version`, and errors that name what the user
//! set (a flag, or an environment variable).

use std::process::{Command, Output};

fn im_server(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_im-server"));
    cmd.args(args);
    // Only what the test sets: a developer's IM_* variables must not leak in.
    for (key, _) in std::env::vars() {
        if key.starts_with("IM_") || key == "REDIS_URL" {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("the im-server binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_shows_every_role_and_the_token_subcommand() {
    let out = im_server(&["--help"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = stdout(&out);
    let usage: Vec<&str> = help.lines().filter(|l| l.contains("im-server ")).collect();
    assert!(
        usage
            .iter()
            .any(|l| l.contains("im-server token --sub USER")),
        "usage lines: {usage:?}"
    );
    assert!(usage.iter().any(|l| l.contains("--version")), "{usage:?}");
    for role in ["all ", "gateway ", "rpc ", "token "] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(role)),
            "role {role:?} missing from:\n{help}"
        );
    }
    // `-h` is the same text, and so is `--help` after a role.
    assert_eq!(stdout(&im_server(&["-h"], &[])), help);
    assert_eq!(stdout(&im_server(&["gateway", "--help"], &[])), help);
    // The token subcommand has its own.
    let token = im_server(&["token", "--help"], &[]);
    assert!(token.status.success());
    assert!(stdout(&token).starts_with("Usage: im-server token --sub USER"));
}

/// The help text of an option, from `--help` (the line after its flag).
fn option_help(help: &str, flag: &str) -> String {
    let mut lines = help.lines();
    lines
        .find(|l| l.trim_start().starts_with(&format!("{flag} ")))
        .unwrap_or_else(|| panic!("{flag} not in --help"));
    lines.next().unwrap_or_default().trim().to_string()
}

#[test]
fn option_help_is_whole_and_complete() {
    let help = stdout(&im_server(&["--help"], &[]));
    let public_key = option_help(&help, "--auth-jwt-public-key-file");
    assert!(
        public_key.ends_with("tokens of either kind are accepted"),
        "{public_key}"
    );
    let redis = option_help(&help, "--redis");
    for form in [
        "redis://[[user]:password@]host",
        "ACL user",
        "unix:///path.sock[?db=N&password=P]",
        "socket path",
        "redis://[:password@]h1:p1,h2:p2",
    ] {
        assert!(redis.contains(form), "--redis help lacks {form:?}: {redis}");
    }
    // Every option's help line ends as a sentence or a clause does, not on
    // a word that leaves it hanging ("… both kinds are").
    let flags = help.lines().filter(|l| l.trim_start().starts_with("--"));
    for flag_line in flags {
        let flag = flag_line.split_whitespace().next().unwrap_or_default();
        let text = option_help(&help, flag);
        let last = text.split_whitespace().last().unwrap_or_default();
        assert!(
            !["are", "is", "the", "a", "and", "or", "of", "to", "with"].contains(&last),
            "{flag}'s help is cut: {text}"
        );
    }
}

#[test]
fn version_prints_the_crate_version() {
    for flag in ["--version", "-V"] {
        let out = im_server(&[flag], &[]);
        assert!(out.status.success(), "{flag}: {}", stderr(&out));
        assert_eq!(
            stdout(&out),
            format!("im-server {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn a_bad_value_is_reported_by_the_name_the_user_set() {
    let out = im_server(&[], &[("IM_MAX_BODY", "1MB")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "im-server: error: IM_MAX_BODY must be a non-negative integer, got \"1MB\"\n"
    );
    let out = im_server(&["--max-body", "1MB"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("im-server: error: --max-body must be"),
        "{}",
        stderr(&out)
    );
    let out = im_server(&["both"], &[]);
    assert!(stderr(&out).contains("expected all, gateway, rpc or token"));
}
