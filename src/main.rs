//! `im-server [all|gateway|rpc] [OPTIONS]`: see `im-server --help`.

use std::process::ExitCode;

use im_server::config::{Config, Parsed, usage};

fn main() -> ExitCode {
    let config = match Config::parse(std::env::args().skip(1), |key| std::env::var(key).ok()) {
        Ok(Parsed::Run(config)) => config,
        Ok(Parsed::Help) => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("im-server: {err}");
            return ExitCode::from(2);
        }
    };
    match im_server::roles::run(*config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("im-server: {err}");
            ExitCode::FAILURE
        }
    }
}
