//! The `vhost-pump` daemon: parses flags, starts the ports, serves the control socket and the
//! metrics endpoint, and stops cleanly on SIGINT/SIGTERM. `vhost-pump ctl` is the client of a
//! running daemon's control socket.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use vhost_pump::cli::{Args, Command, CtlArgs, CtlOp, LogFormat};
use vhost_pump::config::DaemonConfig;
use vhost_pump::control::{self, Request};
use vhost_pump::ports::PortRegistry;
use vhost_pump::{metrics, sandbox};

/// Exit status for bad command lines.
const USAGE: u8 = 2;

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("vhost-pump: {msg}");
    ExitCode::from(USAGE)
}

/// What `--print-capabilities` prints: the object the vhost-user specification defines for
/// backend programs (`VHostUserBackendCapabilities`); a net backend has no further fields.
const CAPABILITIES: &str = r#"{"type": "net"}"#;

fn main() -> ExitCode {
    // Before parsing: the convention is that every other flag is ignored, valid or not.
    if std::env::args_os()
        .skip(1)
        .any(|a| a == "--print-capabilities")
    {
        println!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
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
            return usage_error(line.trim_start_matches("error: "));
        }
    };
    if let Some(Command::Ctl(ctl)) = &args.command {
        return run_ctl(ctl);
    }
    // --log-level, else RUST_LOG (the usual way to turn up a Rust program's logs), else info.
    let (level, from) = match (&args.log_level, std::env::var("RUST_LOG")) {
        (Some(l), _) => (l.clone(), "--log-level"),
        (None, Ok(env)) if !env.trim().is_empty() => (env, "RUST_LOG"),
        _ => ("info".to_string(), "--log-level"),
    };
    let Ok(filter) = tracing_subscriber::EnvFilter::try_new(&level) else {
        return usage_error(&format!("invalid {from} {level:?}"));
    };
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        LogFormat::Text => subscriber.init(),
        LogFormat::Json => subscriber.json().init(),
    }
    let mut switches = Vec::new();
    let ports = match &args.config {
        Some(path) => match DaemonConfig::load(path) {
            Ok(c) => {
                switches = c.switch;
                c.port
            }
            Err(e) => return usage_error(&e.to_string()),
        },
        None if args.port.fd.is_some() => Vec::new(),
        None if args.port.socket.is_none()
            && args.control.is_none()
            && args.state_file.is_none() =>
        {
            return usage_error(
                "one of --socket-path or --fd (with --tap or --af-packet), or --config, is \
                 required",
            )
        }
        None if args.port.socket.is_none() => Vec::new(),
        None => match args.port.to_spec("main") {
            Ok(s) => vec![s],
            Err(e) => return usage_error(&e.to_string()),
        },
    };
    // --fd: the port's listening socket was made by whoever started us.
    let inherited = match args.port.fd {
        Some(fd) => match vhost_pump::server::adopt_listener(fd)
            .map_err(|e| e.to_string())
            .and_then(|(l, path)| {
                let spec = args
                    .port
                    .to_spec_at("main", path)
                    .map_err(|e| e.to_string())?;
                Ok((spec, l))
            }) {
            Ok(p) => Some(p),
            Err(e) => return usage_error(&format!("--fd {fd}: {e}")),
        },
        None => None,
    };
    match run(&args, switches, ports, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-pump: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes the messages already quote.
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// Raises the soft limit on open files to the hard limit. Services often start with a soft
/// limit of 1024, which a busy daemon (sessions, guest memory regions, metrics and control
/// clients) can reach; the hard limit is what the administrator actually allows.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE");
        return;
    }
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        // The kernel refuses more than fs.nr_open.
        if let Some(n) = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|t| t.trim().parse::<libc::rlim_t>().ok())
        {
            target = n;
        }
    }
    if lim.rlim_cur >= target {
        tracing::debug!(
            soft = lim.rlim_cur,
            hard = lim.rlim_max,
            "RLIMIT_NOFILE kept"
        );
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit only reads the rlimit we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, soft = lim.rlim_cur, wanted = target, "cannot raise RLIMIT_NOFILE");
        return;
    }
    tracing::debug!(
        soft = target,
        was = lim.rlim_cur,
        hard = lim.rlim_max,
        "raised RLIMIT_NOFILE"
    );
}

fn run(
    args: &Args,
    switches: Vec<vhost_pump::switch::SwitchSpec>,
    ports: Vec<vhost_pump::config::PortSpec>,
    inherited: Option<(
        vhost_pump::config::PortSpec,
        std::os::unix::net::UnixListener,
    )>,
) -> anyhow::Result<()> {
    raise_nofile_limit();
    if args.no_sandbox {
        tracing::warn!(
            "--no-sandbox: port threads run without the seccomp filter and keep their capabilities"
        );
        sandbox::disable();
    } else {
        sandbox::set_identity(args.sandbox_uid, args.sandbox_gid);
        sandbox::enable();
    }
    let registry = Arc::new(match &args.state_file {
        Some(f) => PortRegistry::with_state_file(f),
        None => PortRegistry::default(),
    });
    let single = ports.len() == 1 && args.config.is_none();
    for spec in switches {
        let name = spec.name.clone();
        // A broken switch is logged; its ports then fail to start and are logged too.
        if let Err(e) = registry.add_switch_unremembered(spec) {
            tracing::error!(switch = %name, error = %e, "switch not started");
        }
    }
    // A port from flags on `--switch NAME` gets that switch, with default settings, if no
    // config defined it: more ports join it with `ctl add --switch NAME`.
    if args.config.is_none() {
        let named = ports.iter().chain(inherited.as_ref().map(|(s, _)| s));
        for spec in named {
            if let vhost_pump::config::HostSpec::Switch(name) = &spec.host {
                if registry.switches().get(name).is_err() {
                    registry
                        .add_switch_unremembered(vhost_pump::switch::SwitchSpec::named(name))?;
                }
            }
        }
    }
    let mut started = 0;
    if let Some((spec, listener)) = inherited {
        // Like a port from flags: its failure is the daemon's.
        registry.add_inherited(spec, listener)?;
        started += 1;
    }
    for spec in ports {
        let name = spec.name.clone();
        match registry.add(spec) {
            Ok(()) => started += 1,
            // With one port from flags, its failure is the daemon's failure.
            Err(e) if single => return Err(e.into()),
            // From a config file, a broken port must not keep its neighbours down.
            Err(e) => tracing::error!(port = %name, error = %e, "port not started"),
        }
    }
    // Ports added at run time before a restart come back (a broken one is logged and dropped).
    if let Some(f) = args.state_file.as_ref().filter(|f| f.exists()) {
        let remembered = DaemonConfig::load(f).with_context(|| {
            format!(
                "state file {} (move it away to start without its ports)",
                f.display()
            )
        })?;
        for (name, r) in registry.restore_switches(remembered.switch) {
            match r {
                Ok(()) => tracing::info!(switch = %name, "switch restored from the state file"),
                Err(e) => {
                    tracing::error!(switch = %name, error = %e, "remembered switch not restored")
                }
            }
        }
        for (name, r) in registry.restore(remembered.port) {
            match r {
                Ok(()) => {
                    started += 1;
                    tracing::info!(port = %name, "port restored from the state file");
                }
                Err(e) => tracing::error!(port = %name, error = %e, "remembered port not restored"),
            }
        }
    }
    if started == 0 && args.control.is_none() {
        anyhow::bail!("no port could be started");
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    if let Some(path) = &args.control {
        control::spawn(path, registry.clone())?;
    }
    if let Some(addr) = &args.metrics {
        metrics::spawn(addr, registry.clone())?;
    }
    tracing::info!(ports = started, "vhost-pump ready");
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "stopping");
    }
    registry.stop_all();
    if let Some(path) = &args.control {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn run_ctl(ctl: &CtlArgs) -> ExitCode {
    let req = match &ctl.op {
        CtlOp::Add { name, port } => match port.to_spec(name) {
            Ok(port) => Request::Add { port },
            Err(e) => return usage_error(&e.to_string()),
        },
        CtlOp::Remove { name } => Request::Remove { name: name.clone() },
        CtlOp::List => Request::List,
        CtlOp::Stats { name } => Request::Stats { name: name.clone() },
        CtlOp::AddSwitch(sw) => {
            let switch = sw.to_spec();
            if let Err(e) = switch.validate() {
                return usage_error(&e.to_string());
            }
            Request::AddSwitch { switch }
        }
        CtlOp::RemoveSwitch { name } => Request::RemoveSwitch { name: name.clone() },
        CtlOp::Switches => Request::ListSwitches,
        CtlOp::Fdb { name } => Request::Fdb { name: name.clone() },
    };
    match control::request(&ctl.control, &req) {
        Ok(resp) if resp.ok => {
            if resp.ports.is_some()
                || resp.stats.is_some()
                || resp.switches.is_some()
                || resp.fdb.is_some()
            {
                let body = resp
                    .ports
                    .map(|p| serde_json::to_string_pretty(&p))
                    .or_else(|| resp.stats.map(|s| serde_json::to_string_pretty(&s)))
                    .or_else(|| resp.switches.map(|s| serde_json::to_string_pretty(&s)))
                    .or_else(|| resp.fdb.map(|s| serde_json::to_string_pretty(&s)));
                if let Some(Ok(text)) = body {
                    println!("{text}");
                }
            }
            ExitCode::SUCCESS
        }
        Ok(resp) => {
            eprintln!("vhost-pump ctl: {}", resp.error.unwrap_or_default());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!(
                "vhost-pump ctl: cannot reach {}: {e}",
                ctl.control.display()
            );
            ExitCode::FAILURE
        }
    }
}
