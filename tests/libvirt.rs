//! libvirt, the tool most QEMU users manage guests with: Debian's libvirtd boots a TCG domain
//! whose network interface is the README's `<interface type='vhostuser'>` snippet, word for
//! word except the socket path. The guest pings the host through vhost-pump, the backend is
//! killed with SIGKILL and started again, QEMU reconnects (`<reconnect enabled='yes'/>`), the
//! guest pings again, and the restarted daemon's counters show the guest's traffic.
//!
//! The test starts `virtlogd` and `libvirtd` itself when no libvirtd answers (and stops what it
//! started). QEMU runs as libvirt's `libvirt-qemu` user, so the vhost-user socket is given to
//! that user (`--socket-owner`) and the guest's kernel is copied somewhere it may read. QEMU
//! 7.2 under TCG crashes on a vhost-user device with MSI-X, so there the domain turns the
//! device's MSI-X vectors off (`<qemu:override>`, libvirt 8.2 and later).
//!
//! Needs root, QEMU and libvirt (`libvirt-daemon-system`, `libvirt-clients`): skipped
//! otherwise, failed under `CI=true`.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::guest;
use testkit::netns::{ctl_json, KillOnDrop as Proc, NamedNetns as Netns};

const NAME: &str = "libvirt_domain_on_the_readme_interface_survives_a_backend_restart";
const NETNS: &str = "vp-libvirt";
const TAP: &str = "vplvtap0";
const HOST_IP: &str = "10.251.0.1";
const GUEST_IP: &str = "10.251.0.2";
const DOMAIN: &str = "vhost-pump-test";
/// Where the README's snippet puts the socket.
const README_SOCKET: &str = "/run/vhost-pump/vm1.sock";
const URI: &str = "qemu:///system";

fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run virsh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "virsh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

/// libvirtd answering on the system URI: already running, or started here (returned, so the
/// test stops it).
fn ensure_libvirtd() -> Result<Vec<Proc>, String> {
    if virsh(&["version"]).is_ok() {
        return Ok(Vec::new());
    }
    let (Some(logd), Some(daemon)) = (which("virtlogd"), which("libvirtd")) else {
        return Err("virtlogd or libvirtd missing (install libvirt-daemon-system)".into());
    };
    std::fs::create_dir_all("/var/log/libvirt/qemu").map_err(|e| e.to_string())?;
    let mut started = Vec::new();
    for bin in [logd, daemon] {
        let child = Command::new(&bin)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        started.push(Proc(child));
        std::thread::sleep(Duration::from_millis(300));
    }
    let t = Instant::now();
    loop {
        match virsh(&["version"]) {
            Ok(_) => return Ok(started),
            Err(e) if t.elapsed() > Duration::from_secs(20) => {
                return Err(format!("libvirtd started but does not answer: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The README's `<interface type='vhostuser'>` element.
fn readme_interface() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let start = readme
        .find("<interface type='vhostuser'>")
        .expect("README has an <interface type='vhostuser'> snippet");
    let end = start
        + readme[start..]
            .find("</interface>")
            .expect("the README's interface element ends")
        + "</interface>".len();
    readme[start..end].to_string()
}

/// The MAC address in the README's snippet.
fn readme_mac(interface: &str) -> String {
    let at = interface.find("<mac address='").expect("snippet has a MAC") + 14;
    interface[at..at + 17].to_string()
}

fn domain_xml(dir: &Path, interface: &str, vectors_off: bool) -> String {
    let mut iface = interface.replace(README_SOCKET, dir.join("vm1.sock").to_str().unwrap());
    // A user alias, so <qemu:override> can name the device.
    iface = iface.replace(
        "</interface>",
        "  <alias name='ua-net0'/>\n    </interface>",
    );
    let over = if vectors_off {
        "<qemu:override><qemu:device alias='ua-net0'><qemu:frontend>\
         <qemu:property name='vectors' type='unsigned' value='0'/>\
         </qemu:frontend></qemu:device></qemu:override>"
    } else {
        ""
    };
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 vp.ip={GUEST_IP}/24 vp.queues=1</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <serial type='unix'>
      <source mode='bind' path='{console}'/>
      <target port='0'/>
    </serial>
    {iface}
    <memballoon model='none'/>
  </devices>
  {over}
</domain>
",
        kernel = dir.join("vmlinuz").display(),
        initrd = dir.join("initramfs.cpio.gz").display(),
        console = dir.join("console.sock").display(),
    )
}

/// The guest's serial console, over the Unix socket libvirt's QEMU listens on.
struct Console {
    stream: UnixStream,
    text: Arc<Mutex<String>>,
    seq: u32,
}

impl Console {
    fn connect(path: &Path, timeout: Duration) -> Result<Console, String> {
        let t = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > timeout => {
                    return Err(format!("console {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let text = Arc::new(Mutex::new(String::new()));
        let (mut r, sink) = (stream.try_clone().map_err(|e| e.to_string())?, text.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ok(Console {
            stream,
            text,
            seq: 0,
        })
    }

    fn tail(&self) -> String {
        let t = self.text.lock().unwrap();
        t[t.len().saturating_sub(2000)..].to_string()
    }

    /// Runs `cmd` in the guest's shell and returns its output.
    fn run(&mut self, cmd: &str, timeout: Duration) -> Result<String, String> {
        self.seq += 1;
        let n = self.seq;
        // Quotes split the markers in the echoed command line, so only the output matches.
        let line = format!("echo '__B{n}''__'; {cmd}; echo '__E{n}''__'\n");
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| e.to_string())?;
        let (b, e) = (format!("__B{n}__"), format!("__E{n}__"));
        let t = Instant::now();
        loop {
            {
                let text = self.text.lock().unwrap();
                if let Some(i) = text.rfind(&b) {
                    if let Some(j) = text[i..].find(&e) {
                        return Ok(text[i + b.len()..i + j].to_string());
                    }
                }
            }
            if t.elapsed() > timeout {
                return Err(format!("guest command {cmd:?} timed out:\n{}", self.tail()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pings the host until one ping is answered (or `timeout`).
    fn ping_until_answered(&mut self, timeout: Duration) -> Result<String, String> {
        let t = Instant::now();
        loop {
            let out = self.run(
                &format!("ping -c 1 -W 2 {HOST_IP}"),
                Duration::from_secs(20),
            )?;
            if out.contains(" 0% packet loss") {
                return Ok(out);
            }
            if t.elapsed() > timeout {
                return Err(format!("no ping answered in {timeout:?}:\n{out}"));
            }
        }
    }
}

fn spawn_daemon(ns: &Netns, dir: &Path, mac: &str, log: &Path) -> Proc {
    let socket = dir.join("vm1.sock");
    let control = dir.join("control.sock");
    let args = [
        "--socket-path",
        socket.to_str().unwrap(),
        "--tap",
        TAP,
        "--mac",
        mac,
        "--socket-owner",
        "libvirt-qemu",
        "--control",
        control.to_str().unwrap(),
    ];
    ns.spawn_daemon(&args, &socket, log)
}

/// Destroys the domain when the test ends, however it ends.
struct Domain;

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", DOMAIN]);
    }
}

#[test]
fn libvirt_domain_on_the_readme_interface_survives_a_backend_restart() {
    if let Some(why) = guest::missing_prereqs() {
        guest::skip_or_fail(NAME, &why);
        return;
    }
    if which("virsh").is_none() {
        guest::skip_or_fail(NAME, "virsh missing (install libvirt-clients)");
        return;
    }
    let _libvirtd = match ensure_libvirtd() {
        Ok(started) => started,
        Err(e) => {
            guest::skip_or_fail(NAME, &e);
            return;
        }
    };
    let (major, _) = guest::qemu_version().unwrap();
    // A directory libvirt's QEMU (user libvirt-qemu) can reach: the socket, the console, the
    // guest's kernel.
    let dir = PathBuf::from("/run/vhost-pump-libvirt-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let guest_dir = guest::guest_dir();
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        std::fs::copy(guest_dir.join(f), dir.join(f)).unwrap();
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let log = dir.join("daemon.log");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    let ns = Netns::create(NETNS);
    ns.exec(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap"]);
    ns.exec(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
    ns.exec(&["ip", "link", "set", TAP, "up"]);
    let interface = readme_interface();
    let mac = readme_mac(&interface);
    let mut daemon = spawn_daemon(&ns, &dir, &mac, &log);

    let _ = virsh(&["destroy", DOMAIN]);
    let xml = dir.join("domain.xml");
    std::fs::write(&xml, domain_xml(&dir, &interface, major < 8)).unwrap();
    if let Err(e) = virsh(&["create", xml.to_str().unwrap()]) {
        panic!(
            "{e}\n--- domain ---\n{}\n--- libvirt's QEMU log ---\n{}",
            std::fs::read_to_string(&xml).unwrap_or_default(),
            std::fs::read_to_string(format!("/var/log/libvirt/qemu/{DOMAIN}.log"))
                .unwrap_or_default()
        );
    }
    let _domain = Domain;
    let qemu_log = || {
        std::fs::read_to_string(format!("/var/log/libvirt/qemu/{DOMAIN}.log")).unwrap_or_default()
    };
    let mut console = Console::connect(&dir.join("console.sock"), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", qemu_log()));
    // The guest's /init prints its marker once eth0 is up, then runs a shell.
    let t = Instant::now();
    while !console.text.lock().unwrap().contains(guest::READY_MARKER) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "guest not ready:\n{}\n{}\n{}",
            console.tail(),
            qemu_log(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    console
        .ping_until_answered(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("before the restart: {e}\n{}", logs()));

    // The backend dies; a new one takes the same socket; QEMU reconnects on its own.
    // SAFETY: kill takes a pid and a signal number; the pid is our child, not yet reaped.
    unsafe { libc::kill(daemon.0.id() as libc::pid_t, libc::SIGKILL) };
    let _ = daemon.0.wait();
    let _daemon = spawn_daemon(&ns, &dir, &mac, &log);
    let out = console
        .ping_until_answered(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("after the restart: {e}\n{}\n{}", logs(), qemu_log()));
    eprintln!(
        "after the backend restart: {}",
        out.trim().replace('\n', " | ")
    );
    let stats = ctl_json(&dir.join("control.sock"), &["stats"]);
    let q = &stats[0]["queues"][0];
    let (rx, tx) = (q["rx"]["frames"].as_u64(), q["tx"]["frames"].as_u64());
    assert!(
        rx.unwrap_or(0) > 0 && tx.unwrap_or(0) > 0,
        "the restarted daemon's counters show no guest traffic: {stats}"
    );
    let info = virsh(&["domstate", DOMAIN]).unwrap_or_default();
    assert!(info.contains("running"), "domain state: {info}");
    let _ = std::fs::remove_dir_all(&dir);
}
