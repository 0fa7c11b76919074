//! The `vhost-pump` daemon: parses flags, opens the host port, serves the vhost-user socket.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use vhost_net_backend::{HostPort, MacAddr, NetBackend, NetConfig};
use vhost_pump::af_packet::AfPacketPort;
use vhost_pump::cli::Args;
use vhost_pump::{server, tap::TapPort};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("vhost-pump: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level);
    let Ok(filter) = filter else {
        eprintln!("vhost-pump: invalid --log-level {:?}", args.log_level);
        return ExitCode::from(2);
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-pump: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let queues = usize::from(args.queues);
    let (port, mtu): (Arc<dyn HostPort>, u16) = match (&args.tap, &args.af_packet) {
        (Some(name), _) => {
            let tap = TapPort::open(name, queues, args.mtu)?;
            let mtu = tap.mtu();
            (Arc::new(tap), mtu)
        }
        (None, Some(ifname)) => {
            let port = AfPacketPort::open(ifname, queues, args.mtu)?;
            let mtu = port.mtu();
            (Arc::new(port), mtu)
        }
        (None, None) => anyhow::bail!("one of --tap or --af-packet is required"),
    };
    let mac = args
        .mac
        .unwrap_or_else(|| MacAddr::local_from_seed(args.socket.as_os_str().as_encoded_bytes()));
    let config = NetConfig {
        mac,
        mtu,
        queue_pairs: queues,
        max_queue_size: args.queue_size,
    };
    let backend = Arc::new(
        NetBackend::new(
            config,
            port,
            Duration::from_micros(u64::from(args.busy_poll_us)),
        )
        .context("cannot build the device")?,
    );

    let socket = args.socket.clone();
    let listener = if args.client {
        None
    } else {
        Some(server::bind(&socket)?)
    };
    let remove_socket = !args.client;
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, "stopping");
                if remove_socket {
                    let _ = std::fs::remove_file(&socket);
                }
                std::process::exit(0);
            }
        })
        .context("cannot start the signal thread")?;

    tracing::info!(
        socket = %args.socket.display(),
        mode = if args.client { "client" } else { "server" },
        %mac,
        queues,
        "vhost-pump ready"
    );
    match listener {
        Some(l) => server::serve_listener(&l, &backend),
        None => server::serve_client(&args.socket, &backend),
    }
}
