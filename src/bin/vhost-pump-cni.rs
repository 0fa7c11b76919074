//! The `vhost-pump-cni` CNI plugin binary: reads the `CNI_*` environment and the network
//! configuration on stdin, prints the result or error JSON on stdout, logs on stderr.
//! `vhost-pump-cni supervise SPEC` is the sidecar supervisor the plugin starts for itself.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use vhost_pump::cni::{self, env::CniEnv, sidecar};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some(sidecar::SUPERVISE_ARG) => {
            let Some(spec) = args.get(1) else {
                eprintln!("usage: vhost-pump-cni supervise SPEC");
                return ExitCode::from(2);
            };
            return ExitCode::from(sidecar::supervise(Path::new(spec)).clamp(0, 255) as u8);
        }
        Some("--version" | "-V" | "version") => {
            println!(
                "vhost-pump-cni {} (CNI spec {})",
                env!("CARGO_PKG_VERSION"),
                cni::version::CniVersion::supported_list()
            );
            return ExitCode::SUCCESS;
        }
        Some("--help" | "-h" | "help") => {
            println!(
                "vhost-pump-cni: CNI plugin giving Kata sandboxes vhost-user network devices \
                 served by vhost-pump.\nRun by a container runtime with CNI_* variables and the \
                 network configuration on stdin; see deploy/ for examples."
            );
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let filter = std::env::var("VHOST_PUMP_CNI_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_default())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match plugin() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vhost-pump-cni: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn plugin() -> anyhow::Result<bool> {
    let mut stdin = Vec::new();
    std::io::stdin()
        .read_to_end(&mut stdin)
        .context("cannot read stdin")?;
    let outcome = cni::run(&CniEnv::from_process(), &stdin);
    if let Some(json) = &outcome.stdout {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, json).context("cannot write stdout")?;
        out.write_all(b"\n").context("cannot write stdout")?;
    }
    if !outcome.success {
        if let Some(json) = &outcome.stdout {
            eprintln!(
                "vhost-pump-cni: error {}: {}",
                json["code"],
                json["msg"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(outcome.success)
}
