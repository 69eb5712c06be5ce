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
    // One thread: a current-thread runtime skips the work-stealing machinery.
    let mut builder = match config.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("im-server: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(im_server::roles::run(*config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("im-server: {err}");
            ExitCode::FAILURE
        }
    }
}
