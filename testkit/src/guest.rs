//! Boots the minimal test guest of `tests/setup/build-guest.sh` under QEMU and drives its serial
//! console.
//!
//! The guest is a Debian cloud kernel plus a busybox initramfs whose `/init` loads virtio-net,
//! configures `eth0` from `vp.*` kernel parameters, prints `VP-READY` and then runs a root shell
//! on ttyS0. QEMU's serial port is wired to its stdin/stdout pipes: a reader thread collects
//! everything the guest prints (also copied to `console.log`), and [`QemuGuest::run`] types a
//! command and cuts its output out between unique markers.
//!
//! Quirks of the machines this runs on: /dev/kvm is a nested hypervisor that cannot boot a
//! stock guest kernel, so TCG (`-accel tcg,thread=multi -cpu max`) by default; on a host with working KVM set
//! `VHOST_PUMP_QEMU_ACCEL=kvm` (or [`GuestOpts::accel`]) for `-accel kvm -cpu host`. QEMU < 8
//! under TCG crashes with a vhost-user netdev and MSI-X, so `vectors=0` (INTx) is added
//! automatically there.
//!
//! Only std is used, so any test crate can include this module.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// QEMU accelerator of a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Multi-threaded TCG, `-cpu max` (works everywhere, the vCPU is slow).
    Tcg,
    /// KVM, `-cpu host` (needs a `/dev/kvm` that boots a stock kernel).
    Kvm,
}

impl Accel {
    /// `VHOST_PUMP_QEMU_ACCEL` (`kvm` or `tcg`); TCG when unset or anything else.
    pub fn from_env() -> Accel {
        match std::env::var("VHOST_PUMP_QEMU_ACCEL").as_deref() {
            Ok("kvm") => Accel::Kvm,
            _ => Accel::Tcg,
        }
    }

    /// Name as in QEMU's `-accel`.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// Marker the guest's `/init` prints once eth0 is up.
pub const READY_MARKER: &str = "VP-READY";
/// Prefix of the line the guest's `/init` prints when it cannot bring eth0 up.
pub const ERROR_MARKER: &str = "VP-ERROR";

/// QEMU binary: `$VHOST_PUMP_QEMU`, else `qemu-system-x86_64` from `PATH`.
pub fn qemu_binary() -> String {
    std::env::var("VHOST_PUMP_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

/// Version `(major, minor)` of the QEMU binary, from `--version` (cached).
pub fn qemu_version() -> io::Result<(u32, u32)> {
    static VERSION: OnceLock<Result<(u32, u32), String>> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            let out = Command::new(qemu_binary())
                .arg("--version")
                .output()
                .map_err(|e| format!("cannot run {} --version: {e}", qemu_binary()))?;
            let text = String::from_utf8_lossy(&out.stdout);
            parse_qemu_version(&text)
                .ok_or_else(|| format!("unrecognised QEMU version output: {text:?}"))
        })
        .clone()
        .map_err(io::Error::other)
}

/// A QEMU build other than the system's: its binary and the firmware directories it needs
/// (`-L`). See [`migration_qemu`].
#[derive(Clone, Debug)]
pub struct Qemu {
    /// `qemu-system-x86_64`.
    pub binary: PathBuf,
    /// Firmware and option ROM directories, passed with `-L` ahead of the built-in one.
    pub data_dirs: Vec<PathBuf>,
}

impl Qemu {
    /// The system's QEMU ([`qemu_binary`]).
    pub fn system() -> Qemu {
        Qemu {
            binary: PathBuf::from(qemu_binary()),
            data_dirs: Vec::new(),
        }
    }

    /// Version `(major, minor)` from `--version` (cached per binary).
    pub fn version(&self) -> io::Result<(u32, u32)> {
        static VERSIONS: Mutex<Vec<(PathBuf, (u32, u32))>> = Mutex::new(Vec::new());
        let mut known = VERSIONS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, v)) = known.iter().find(|(b, _)| *b == self.binary) {
            return Ok(*v);
        }
        let out = Command::new(&self.binary)
            .arg("--version")
            .output()
            .map_err(|e| {
                io::Error::other(format!(
                    "cannot run {} --version: {e}",
                    self.binary.display()
                ))
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v = parse_qemu_version(&text).ok_or_else(|| {
            io::Error::other(format!("unrecognised QEMU version output: {text:?}"))
        })?;
        known.push((self.binary.clone(), v));
        Ok(v)
    }
}

/// The QEMU the live-migration tests use: QEMU 7.2 under TCG corrupts a migrating guest that
/// receives network traffic whatever its backend (its own tap device included), so these tests
/// need 8.0 or later: `$VHOST_PUMP_MIGRATION_QEMU` (a binary), else the system's QEMU if it is
/// recent enough, else QEMU 10 from Debian's bookworm-backports, fetched and unpacked into a
/// cache by `tests/setup/fetch-qemu.sh` (run at most once per process).
pub fn migration_qemu() -> io::Result<Qemu> {
    if let Ok(b) = std::env::var("VHOST_PUMP_MIGRATION_QEMU") {
        return Ok(Qemu {
            binary: b.into(),
            data_dirs: Vec::new(),
        });
    }
    let system = Qemu::system();
    if system.version().is_ok_and(|v| v >= (8, 0)) {
        return Ok(system);
    }
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = DIR
        .get_or_init(|| run_setup_script(&crate::repo_root().join("tests/setup/fetch-qemu.sh")))
        .clone()
        .map_err(io::Error::other)?;
    Ok(Qemu {
        binary: dir.join("usr/bin/qemu-system-x86_64"),
        data_dirs: vec![dir.join("usr/share/qemu"), dir.join("usr/share/seabios")],
    })
}

/// Parses "QEMU emulator version 7.2.22 (Debian ...)" into `(7, 2)`.
pub fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = &text[text.find("version ")? + "version ".len()..];
    let ver = rest.split_whitespace().next()?;
    let mut parts = ver.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
}

/// Path of `tests/setup/build-guest.sh`.
pub fn build_script() -> PathBuf {
    crate::repo_root().join("tests/setup/build-guest.sh")
}

/// Directory holding the guest's `vmlinuz` and `initramfs.cpio.gz`, built (or found in the
/// cache) by `tests/setup/build-guest.sh`. Runs the script at most once per process.
///
/// # Panics
/// If the script fails; use [`try_guest_dir`] to get the error instead.
pub fn guest_dir() -> PathBuf {
    try_guest_dir().unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`guest_dir`], returning the script's failure as an error.
pub fn try_guest_dir() -> io::Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = build_script();
        let dir = run_setup_script(&script)?;
        for f in ["vmlinuz", "initramfs.cpio.gz"] {
            if !dir.join(f).is_file() {
                return Err(format!(
                    "{} did not produce {}",
                    script.display(),
                    dir.join(f).display()
                ));
            }
        }
        Ok(dir)
    })
    .clone()
    .map_err(io::Error::other)
}

/// Runs one of the `tests/setup` scripts that build or fetch something into a cache and print
/// its directory as their last line; returns that directory.
fn run_setup_script(script: &Path) -> Result<PathBuf, String> {
    let out = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(PathBuf::from(stdout.lines().last().unwrap_or("").trim()))
}

/// Why the VM tests cannot run on this machine, or `None` if they can (root, QEMU, /dev/net/tun).
pub fn missing_prereqs() -> Option<String> {
    let root = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false);
    if !root {
        return Some("needs root (tap devices, the guest build's mknod)".into());
    }
    if let Err(e) = qemu_version() {
        return Some(format!(
            "QEMU unusable: {e} (run tests/setup/install-deps.sh)"
        ));
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    None
}

/// Reports a test that cannot run here: panics when `CI=true` (CI must run every test), else
/// prints the reason so the caller can return early.
pub fn skip_or_fail(test: &str, reason: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: cannot run under CI: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// How the guest's virtio-net device is backed.
#[derive(Clone, Debug)]
pub enum NetKind {
    /// A vhost-user backend listening on `socket` (QEMU connects as the client). Guest memory is
    /// a shared memfd so the backend can map it.
    VhostUser {
        /// The backend's listening socket.
        socket: PathBuf,
        /// Queue pairs of the netdev and device.
        queues: u32,
        /// Let QEMU reconnect after the backend goes away (`reconnect=1` / `reconnect-ms`).
        reconnect: bool,
    },
    /// QEMU's own tap path (`vhost=off`: there is no /dev/vhost-net here). The tap must exist
    /// (created with `multi_queue` if [`GuestOpts::queues`] > 1).
    Tap {
        /// Host tap interface name.
        ifname: String,
    },
}

/// Options for [`QemuGuest::start`]. Build with [`GuestOpts::tap`] or [`GuestOpts::vhost_user`]
/// and adjust the public fields.
#[derive(Clone, Debug)]
pub struct GuestOpts {
    /// Backing of the virtio-net device.
    pub net: NetKind,
    /// Guest MAC address.
    pub mac: String,
    /// eth0 address as `ADDR/PREFIX` (kernel parameter `vp.ip`).
    pub ip: Option<String>,
    /// Default gateway (`vp.gw`).
    pub gateway: Option<String>,
    /// eth0 MTU (`vp.mtu`).
    pub mtu: Option<u32>,
    /// Combined channels the guest enables with `ethtool -L` (`vp.queues`); default: all queue
    /// pairs of the device. For a tap it is also the device's queue pair count.
    pub queues: Option<u32>,
    /// Guest memory in MiB (default 512).
    pub memory_mib: u32,
    /// Guest vCPUs (default 1).
    pub vcpus: u32,
    /// Accelerator (default: [`Accel::from_env`]).
    pub accel: Accel,
    /// MSI-X vectors of the device; default: 0 on QEMU < 8 (INTx, see the module docs), QEMU's
    /// default for one queue pair, `2N+2` for N pairs.
    pub vectors: Option<u32>,
    /// Extra `key=value` properties for `-device virtio-net-pci` (e.g. `host_mtu=9000`).
    pub device_props: Vec<String>,
    /// Extra kernel command line parameters.
    pub kernel_args: Vec<String>,
    /// Extra QEMU arguments.
    pub qemu_args: Vec<String>,
    /// For vhost-user: QEMU listens on the socket (`server=on,wait=off`) and the backend
    /// connects (`vhost-pump --client`), as with Kata Dragonball. `reconnect` is then unused.
    pub vhost_user_server: bool,
    /// For vhost-user: the netdev, device and memory arguments Kata runtime-go gives QEMU for a
    /// vhost-user endpoint: guest memory `memory-backend-file` on /dev/shm with `share=on`,
    /// `-chardev socket,id=char-..,path=..` (client, no reconnect), `-netdev
    /// type=vhost-user,..,vhostforce` and `-device virtio-net-pci,netdev=..,mac=..` without
    /// `mq`. The one difference: `vectors=0` on QEMU < 8 under TCG (see the module docs).
    pub kata_go: bool,
    /// Serve QEMU's human monitor (HMP) on this Unix socket, for [`hmp`].
    pub monitor_socket: Option<PathBuf>,
    /// Allow memory hotplug up to this much memory (MiB), with 4 DIMM slots.
    pub max_memory_mib: Option<u32>,
    /// Label for the log directory.
    pub name: String,
    /// Directory with `vmlinuz` and `initramfs.cpio.gz`; default: [`guest_dir`].
    pub guest_dir: Option<PathBuf>,
    /// QEMU to run; default: the system's ([`Qemu::system`]).
    pub qemu: Option<Qemu>,
}

impl GuestOpts {
    fn with_net(net: NetKind) -> Self {
        GuestOpts {
            net,
            mac: "52:54:00:12:34:56".into(),
            ip: None,
            gateway: None,
            mtu: None,
            queues: None,
            memory_mib: 512,
            vcpus: 1,
            accel: Accel::from_env(),
            vectors: None,
            device_props: Vec::new(),
            kernel_args: Vec::new(),
            qemu_args: Vec::new(),
            vhost_user_server: false,
            kata_go: false,
            monitor_socket: None,
            max_memory_mib: None,
            name: "guest".into(),
            guest_dir: None,
            qemu: None,
        }
    }

    /// A guest on host tap `ifname`.
    pub fn tap(ifname: &str) -> Self {
        Self::with_net(NetKind::Tap {
            ifname: ifname.into(),
        })
    }

    /// A guest on the vhost-user backend at `socket` with `queues` queue pairs (no reconnect).
    pub fn vhost_user(socket: impl Into<PathBuf>, queues: u32) -> Self {
        Self::with_net(NetKind::VhostUser {
            socket: socket.into(),
            queues,
            reconnect: false,
        })
    }

    /// Queue pairs of the device.
    pub fn device_queues(&self) -> u32 {
        match &self.net {
            NetKind::VhostUser { queues, .. } => (*queues).max(1),
            NetKind::Tap { .. } => self.queues.unwrap_or(1).max(1),
        }
    }

    /// The QEMU command line (without the binary) for these options.
    pub fn qemu_args(&self, dir: &Path) -> io::Result<Vec<String>> {
        let qemu = self.qemu.clone().unwrap_or_else(Qemu::system);
        let (major, minor) = qemu.version()?;
        let pairs = self.device_queues();
        let mem = self.memory_mib;
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|s| s.to_string()));

        let (accel, cpu) = match self.accel {
            Accel::Tcg => ("tcg,thread=multi", "max"),
            Accel::Kvm => ("kvm", "host"),
        };
        for d in &qemu.data_dirs {
            push(&["-L", &d.to_string_lossy()]);
        }
        push(&["-name", &self.name, "-accel", accel, "-cpu", cpu]);
        push(&[
            "-smp",
            &self.vcpus.max(1).to_string(),
            "-m",
            &match self.max_memory_mib {
                Some(max) => format!("{mem}M,slots=4,maxmem={max}M"),
                None => format!("{mem}M"),
            },
        ]);
        // No default devices or monitor; the serial port is QEMU's stdin/stdout; a guest
        // reboot (panic=-1) ends QEMU instead of looping.
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            &match &self.monitor_socket {
                Some(p) => format!("unix:{},server=on,wait=off", p.display()),
                None => "none".into(),
            },
        ]);
        push(&["-serial", "stdio", "-no-reboot"]);

        let mut cmdline = vec![
            "console=ttyS0".to_string(),
            "quiet".into(),
            "panic=-1".into(),
        ];
        if let Some(ip) = &self.ip {
            cmdline.push(format!("vp.ip={ip}"));
        }
        if let Some(gw) = &self.gateway {
            cmdline.push(format!("vp.gw={gw}"));
        }
        if let Some(mtu) = self.mtu {
            cmdline.push(format!("vp.mtu={mtu}"));
        }
        cmdline.push(format!("vp.queues={}", self.queues.unwrap_or(pairs)));
        cmdline.extend(self.kernel_args.iter().cloned());
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initramfs.cpio.gz");
        push(&[
            "-kernel",
            &kernel.to_string_lossy(),
            "-initrd",
            &initrd.to_string_lossy(),
        ]);
        push(&["-append", &cmdline.join(" ")]);

        match &self.net {
            NetKind::VhostUser { socket, .. } if self.kata_go => {
                push(&[
                    "-object",
                    &format!("memory-backend-file,id=dimm1,size={mem}M,mem-path=/dev/shm,share=on"),
                ]);
                push(&["-numa", "node,memdev=dimm1"]);
                push(&[
                    "-chardev",
                    &format!("socket,id=char-vp0,path={}", socket.display()),
                ]);
                push(&[
                    "-netdev",
                    "type=vhost-user,id=net-vp0,chardev=char-vp0,vhostforce",
                ]);
            }
            NetKind::VhostUser {
                socket,
                queues: _,
                reconnect,
            } => {
                // The backend maps guest memory: it must be a shared file, not anonymous memory.
                push(&[
                    "-object",
                    &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
                ]);
                push(&["-numa", "node,memdev=mem"]);
                let mut chardev = format!("socket,id=c0,path={}", socket.display());
                if self.vhost_user_server {
                    chardev.push_str(",server=on,wait=off");
                } else if *reconnect {
                    // `reconnect` became `reconnect-ms` in QEMU 9.2.
                    if (major, minor) >= (9, 2) {
                        chardev.push_str(",reconnect-ms=1000");
                    } else {
                        chardev.push_str(",reconnect=1");
                    }
                }
                push(&["-chardev", &chardev]);
                push(&[
                    "-netdev",
                    &format!("vhost-user,id=n0,chardev=c0,queues={pairs}"),
                ]);
            }
            NetKind::Tap { ifname } => {
                let mut netdev =
                    format!("tap,id=n0,ifname={ifname},script=no,downscript=no,vhost=off");
                if pairs > 1 {
                    netdev.push_str(&format!(",queues={pairs}"));
                }
                push(&["-netdev", &netdev]);
            }
        }

        let netdev = if self.kata_go { "net-vp0" } else { "n0" };
        let mut device = format!("virtio-net-pci,netdev={netdev},mac={}", self.mac);
        if pairs > 1 {
            device.push_str(",mq=on");
        }
        let vectors = match self.vectors {
            Some(v) => Some(v),
            None if major < 8 => Some(0),
            None if pairs > 1 => Some(2 * pairs + 2),
            None => None,
        };
        if let Some(v) = vectors {
            device.push_str(&format!(",vectors={v}"));
        }
        for prop in &self.device_props {
            device.push(',');
            device.push_str(prop);
        }
        push(&["-device", &device]);

        a.extend(self.qemu_args.iter().cloned());
        Ok(a)
    }
}

/// Output of a command run in the guest with [`QemuGuest::run`]. Derefs to the output text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdOutput {
    /// What the command printed (stdout and stderr, `\r\n` turned into `\n`).
    pub output: String,
    /// Its exit status (`$?`).
    pub status: i32,
}

impl CmdOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

impl Deref for CmdOutput {
    type Target = str;
    fn deref(&self) -> &str {
        &self.output
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[exit status {}]", self.output, self.status)
    }
}

/// Everything the guest printed so far, filled by the reader thread.
#[derive(Default)]
struct ConsoleBuf {
    data: Vec<u8>,
    /// QEMU closed its stdout (it exited).
    eof: bool,
}

#[derive(Default)]
struct Console {
    buf: Mutex<ConsoleBuf>,
    grew: Condvar,
}

/// A running QEMU guest; QEMU is killed on drop.
pub struct QemuGuest {
    child: Child,
    stdin: ChildStdin,
    console: Arc<Console>,
    reader: Option<JoinHandle<()>>,
    /// Console bytes before this offset were consumed by `wait_for`.
    cursor: usize,
    /// Counter making the markers of each `run` unique.
    seq: u64,
    started: Instant,
    log_dir: PathBuf,
    command_line: String,
}

impl QemuGuest {
    /// Starts QEMU with `opts` (builds the guest first if needed). Returns once QEMU is
    /// spawned; use [`wait_ready`](Self::wait_ready) to wait for the guest's network.
    pub fn start(opts: &GuestOpts) -> io::Result<QemuGuest> {
        let dir = match &opts.guest_dir {
            Some(d) => d.clone(),
            None => try_guest_dir()?,
        };
        let args = opts.qemu_args(&dir)?;
        let log_dir = new_log_dir(&opts.name)?;
        let binary = opts.qemu.clone().unwrap_or_else(Qemu::system).binary;
        let command_line = format!("{} {}", binary.display(), shell_join(&args));
        fs::write(log_dir.join("qemu.cmdline"), format!("{command_line}\n"))?;
        let stderr = File::create(log_dir.join("qemu.log"))?;
        let mut console_log = File::create(log_dir.join("console.log"))?;

        let mut child = Command::new(&binary)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {command_line}: {e}")))?;
        let started = Instant::now();
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = child.stdout.take().expect("piped stdout");

        let console = Arc::new(Console::default());
        let sink = Arc::clone(&console);
        let reader = std::thread::Builder::new()
            .name(format!("{}-console", opts.name))
            .spawn(move || {
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match stdout.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    let _ = console_log.write_all(&chunk[..n]);
                    let mut buf = sink.buf.lock().unwrap();
                    buf.data.extend_from_slice(&chunk[..n]);
                    sink.grew.notify_all();
                }
                sink.buf.lock().unwrap().eof = true;
                sink.grew.notify_all();
            })?;

        Ok(QemuGuest {
            child,
            stdin,
            console,
            reader: Some(reader),
            cursor: 0,
            seq: 0,
            started,
            log_dir,
            command_line,
        })
    }

    /// Directory with this guest's `qemu.cmdline`, `qemu.log` (QEMU's stderr) and
    /// `console.log` (everything the guest printed).
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Path of QEMU's stderr log.
    pub fn qemu_log(&self) -> PathBuf {
        self.log_dir.join("qemu.log")
    }

    /// The QEMU command line, shell-quoted.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since QEMU was spawned.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// QEMU's exit status if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Everything the guest printed so far.
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&self.console.buf.lock().unwrap().data).into_owned()
    }

    /// Waits until `marker` appears in console output not consumed yet; returns the output up
    /// to and including the marker, and consumes it. Fails on timeout or if QEMU exits.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> io::Result<String> {
        self.wait_for_any(&[marker], timeout).map(|(_, text)| text)
    }

    /// Like [`wait_for`](Self::wait_for) with several markers: stops at the first one that
    /// appears and returns its index with the output up to and including it.
    pub fn wait_for_any(
        &mut self,
        markers: &[&str],
        timeout: Duration,
    ) -> io::Result<(usize, String)> {
        let deadline = Instant::now() + timeout;
        let console = Arc::clone(&self.console);
        let mut buf = console.buf.lock().unwrap();
        loop {
            // The earliest match wins, whichever marker it is.
            let hit = markers
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    find(&buf.data[self.cursor..], m.as_bytes()).map(|pos| (pos, i))
                })
                .min();
            if let Some((pos, i)) = hit {
                let end = self.cursor + pos + markers[i].len();
                let text = String::from_utf8_lossy(&buf.data[self.cursor..end]).into_owned();
                self.cursor = end;
                return Ok((i, text));
            }
            if buf.eof {
                drop(buf);
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(self.error(
                    io::ErrorKind::UnexpectedEof,
                    &format!("QEMU exited ({status}) before {markers:?} appeared"),
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                drop(buf);
                return Err(self.error(
                    io::ErrorKind::TimedOut,
                    &format!("timed out after {timeout:?} waiting for {markers:?}"),
                ));
            }
            buf = console.grew.wait_timeout(buf, deadline - now).unwrap().0;
        }
    }

    /// Waits for the guest's `VP-READY` line; returns the time since QEMU started. Fails as
    /// soon as `/init` reports `VP-ERROR` instead.
    pub fn wait_ready(&mut self, timeout: Duration) -> io::Result<Duration> {
        let (which, _) = self.wait_for_any(&[READY_MARKER, ERROR_MARKER], timeout)?;
        if which == 1 {
            let reason = self
                .wait_for("\n", Duration::from_secs(5))
                .unwrap_or_default();
            return Err(self.error(
                io::ErrorKind::Other,
                &format!("guest: {ERROR_MARKER}{}", reason.trim_end()),
            ));
        }
        Ok(self.uptime())
    }

    /// Types `line` and a newline on the guest console.
    pub fn send_line(&mut self, line: &str) -> io::Result<()> {
        self.stdin.write_all(line.as_bytes())?;
        self.stdin.write_all(b"\n")?;
        self.stdin.flush()
    }

    /// Runs a shell command in the guest (after [`wait_ready`](Self::wait_ready)) and returns
    /// its output and exit status. The command may span several lines and may start background
    /// jobs (`cmd &`); its stdin is /dev/null. Fails on timeout (the command keeps running).
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> io::Result<CmdOutput> {
        // The tty line buffer holds 4095 bytes; longer input would be cut.
        if cmd.len() > 3500 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "guest command too long",
            ));
        }
        self.seq += 1;
        let n = self.seq;
        let begin = format!("__VPB{n}__");
        let end = format!("__VPE{n}__");
        // The quotes split the markers in the typed text, so the console's echo of the command
        // never matches them; only the shell's output does. The group runs in the current shell
        // (a `cd` sticks) and `$?` is the status of its last command.
        let typed =
            format!("{{ echo '__VPB{n}''__'; {cmd}\n}} </dev/null; echo \"__VPE{n}\"\"__$?__\"");
        self.send_line(&typed)?;
        let deadline = Instant::now() + timeout;
        self.wait_for(&begin, timeout)?;
        let left = || deadline.saturating_duration_since(Instant::now());
        let body = self.wait_for(&end, left())?;
        let status_text = self.wait_for("__", left())?;
        let status_text = status_text.trim_end_matches("__");
        let status = status_text.parse::<i32>().map_err(|_| {
            self.error(
                io::ErrorKind::InvalidData,
                &format!("bad exit status {status_text:?}"),
            )
        })?;
        let mut output = body[..body.len() - end.len()]
            .replace("\r\n", "\n")
            .replace('\r', "");
        // Drop the newline that ended the begin marker's line.
        if output.starts_with('\n') {
            output.remove(0);
        }
        Ok(CmdOutput { output, status })
    }

    /// Like [`run`](Self::run), but a non-zero exit status is an error; returns the output.
    pub fn run_ok(&mut self, cmd: &str, timeout: Duration) -> io::Result<String> {
        let out = self.run(cmd, timeout)?;
        if out.success() {
            Ok(out.output)
        } else {
            Err(self.error(
                io::ErrorKind::Other,
                &format!(
                    "guest command {cmd:?} failed with status {}:\n{}",
                    out.status, out.output
                ),
            ))
        }
    }

    /// Kills QEMU and waits for it (also done on drop).
    pub fn kill(&mut self) -> io::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill()?;
        }
        self.child.wait()?;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Ok(())
    }

    /// An error carrying `msg`, the last console lines and where the logs are.
    fn error(&self, kind: io::ErrorKind, msg: &str) -> io::Error {
        let console = self.console_text();
        let lines: Vec<&str> = console.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        let qemu_log = fs::read_to_string(self.qemu_log()).unwrap_or_default();
        let qemu_tail: Vec<&str> = qemu_log.lines().collect();
        let qemu_tail = qemu_tail[qemu_tail.len().saturating_sub(10)..].join("\n");
        io::Error::new(
            kind,
            format!(
                "{msg}\n--- console (last lines) ---\n{tail}\n--- qemu stderr ---\n{qemu_tail}\n\
                 --- logs: {} (console.log, qemu.log, qemu.cmdline)",
                self.log_dir.display()
            ),
        )
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A fresh directory for one guest's logs, under Cargo's per-target temp dir when there is one.
fn new_log_dir(name: &str) -> io::Result<PathBuf> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let base = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("vp-guest");
    let dir = base.join(format!(
        "{name}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Joins arguments into one shell-quoted line (for logs and error messages).
fn shell_join(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=,./:@+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs one command on QEMU's human monitor at `socket` and returns its output.
pub fn hmp(socket: &Path, cmd: &str) -> io::Result<String> {
    use std::os::unix::net::UnixStream;
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let read_prompt = |s: &mut UnixStream| -> io::Result<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&out).ends_with("(qemu) ") {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    read_prompt(&mut s)?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let out = read_prompt(&mut s)?;
    Ok(out.trim_end_matches("(qemu) ").to_string())
}

/// The receiver's Mbit/s from `iperf3 -f m` output.
pub fn iperf_mbps(out: &str) -> Option<f64> {
    let line = out.lines().rev().find(|l| l.contains("receiver"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "Mbits/sec")?;
    words.get(i.checked_sub(1)?)?.parse().ok()
}

/// One counter from `ethtool -S` output (`key: value` lines); 0 when absent.
pub fn ethtool_stat(out: &str, key: &str) -> u64 {
    out.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(key)
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
