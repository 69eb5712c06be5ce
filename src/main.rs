//! `im-server [all|gateway|rpc] [OPTIONS]`: see `im-server --help`;
//! `im-server --version`;
//! `im-server token --sub USER`: mints a development token;
//! `im-server export|import --chat CHAT --redis URL`: a chat as NDJSON.

use std::process::ExitCode;

use im_server::config::{Config, Parsed, usage, version};

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("token") {
        return token(std::env::args().skip(2));
    }
    if let Some(name @ ("export" | "import")) = std::env::args().nth(1).as_deref() {
        return match im_server::transfer::main(name, std::env::args().skip(2).collect()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("im-server {name}: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::parse(std::env::args().skip(1), |key| std::env::var(key).ok()) {
        Ok(Parsed::Run(config)) => config,
        Ok(Parsed::Help) => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            print!("{}", version());
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            im_server::logging::fatal(&err);
            return ExitCode::from(2);
        }
    };
    im_server::logging::init(config.log_level.clone());
    match im_server::roles::run(*config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            im_server::logging::fatal(&err);
            ExitCode::FAILURE
        }
    }
}

/// `im-server token ...`: prints a token (see `im_server::auth::token_cmd`).
fn token(args: impl Iterator<Item = String>) -> ExitCode {
    use im_server::auth::token_cmd::{USAGE, mint_from_args};
    let args: Vec<String> = args.collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let now = im_server::now_micros() / 1_000_000;
    match mint_from_args(args, |key| std::env::var(key).ok(), now) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("im-server token: {err}");
            ExitCode::from(2)
        }
    }
}
