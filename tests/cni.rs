//! The `vhost-pump-cni` plugin, run exactly as a container runtime runs it: `CNI_*` variables,
//! the network configuration on stdin, the result or error JSON on stdout. Every test works in
//! a named network namespace of its own (`ip netns exec` also gives the plugin a private mount
//! namespace) with its own socket, DAN and IPAM directories, and Debian's real `host-local`
//! from /usr/lib/cni as the IPAM plugin.
//!
//! Covered, per `"kata"` path:
//! - `go` (Kata runtime-go + QEMU): what Kata's netns scan finds (a dummy link with the IPAM
//!   address and the guest MAC, a listening socket at `/tmp/vhostuser_<IP>/vhu.sock`), a QEMU
//!   guest started with exactly Kata's arguments pinging the gateway, a backend restart under a
//!   QEMU that cannot reconnect reported by CHECK, IPv6-only IPAM, and DEL leaving nothing;
//! - `rs` (runtime-rs + Dragonball): the DAN file read with a strict mirror of Kata's schema, a
//!   QEMU guest listening on the socket (standing in for Dragonball) getting the backend's
//!   connection, server mode refused, 22 concurrent ADDs merging DAN files;
//! - `none`: ADD/CHECK/DEL/DEL, sidecar restart, GC, STATUS, VERSION, answers in 0.4.0, 1.0.0
//!   and 1.1.0, AF_PACKET on a macvlan, bad inputs and a failed ADD leaving nothing behind;
//! - node-daemon mode: two pods on one node daemon, both guests pinging, both in its metrics,
//!   DEL of one leaving the other running.
//!
//! Needs root (skipped otherwise, failed under `CI=true`).

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use testkit::guest::{self, GuestOpts, QemuGuest};

const PLUGIN: &str = env!("CARGO_BIN_EXE_vhost-pump-cni");
const DAEMON: &str = env!("CARGO_BIN_EXE_vhost-pump");
const CNI_PATH: &str = "/usr/lib/cni";

// ---------------------------------------------------------------------------------------------
// A strict mirror of Kata runtime-rs's DAN schema (resource/src/network/dan.rs): every key the
// plugin writes must be one Kata knows. `guest_mac` and `mtu` are required here because the Go
// runtime needs them (the portable subset).

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KataDanConfig {
    netns: Option<String>,
    devices: Vec<KataDanDevice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KataDanDevice {
    name: String,
    guest_mac: String,
    device: KataDevice,
    network_info: KataNetworkInfo,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
enum KataDevice {
    #[serde(rename = "vhost-user")]
    VhostUser {
        path: String,
        #[serde(default)]
        queue_num: usize,
        #[serde(default)]
        queue_size: usize,
    },
    #[serde(rename = "host-tap")]
    #[allow(dead_code)]
    HostTap {
        tap_name: String,
        #[serde(default)]
        queue_num: usize,
        #[serde(default)]
        queue_size: usize,
    },
    #[serde(rename = "vfio")]
    #[allow(dead_code)]
    Vfio { pci_device_id: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KataNetworkInfo {
    interface: KataInterface,
    #[serde(default)]
    routes: Vec<KataRoute>,
    #[serde(default)]
    neighbors: Vec<KataNeighbor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KataInterface {
    ip_addresses: Vec<String>,
    mtu: u64,
    #[serde(default)]
    #[allow(dead_code)]
    ntype: String,
    #[serde(default)]
    #[allow(dead_code)]
    flags: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KataRoute {
    #[serde(default)]
    dest: String,
    #[serde(default)]
    gateway: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    scope: u32,
    #[serde(default)]
    #[allow(dead_code)]
    flags: u32,
    #[serde(default)]
    #[allow(dead_code)]
    mtu: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct KataNeighbor {
    ip_address: Option<String>,
    #[serde(default)]
    hardware_addr: String,
    #[serde(default)]
    state: u32,
    #[serde(default)]
    flags: u32,
}

// ---------------------------------------------------------------------------------------------
// Harness.

/// Why these tests cannot run here, if they cannot.
fn missing_prereqs() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, taps, bridges)".into());
    }
    if !Path::new(CNI_PATH).join("host-local").exists() {
        return Some(format!(
            "{CNI_PATH}/host-local is missing (apt-get install containernetworking-plugins)"
        ));
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("iproute2's `ip` is not available".into()),
    }
}

/// Skips (or fails under CI) when the prerequisites are missing; true when the test may run.
fn can_run(test: &str) -> bool {
    match missing_prereqs() {
        Some(why) => {
            guest::skip_or_fail(test, &why);
            false
        }
        None => true,
    }
}

/// Runs `ip -n NS ARGS` and returns its output; fails the test if `ip` fails.
#[track_caller]
fn ip_in(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`can_run`], for tests that also boot a QEMU guest.
fn can_boot(test: &str) -> bool {
    if !can_run(test) {
        return false;
    }
    match guest::missing_prereqs() {
        Some(why) => {
            guest::skip_or_fail(test, &why);
            false
        }
        None => true,
    }
}

/// Pids of processes whose command line contains `needle`.
fn procs_with(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .is_ok_and(|c| c.contains(needle))
                && fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    !s.rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                })
        })
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The answer of one plugin run.
#[derive(Debug)]
struct Reply {
    success: bool,
    json: Option<Value>,
    stdout: String,
    #[allow(dead_code)] // shown by Debug when an assertion fails
    stderr: String,
}

impl Reply {
    fn code(&self) -> Option<u64> {
        self.json.as_ref()?.get("code")?.as_u64()
    }

    #[track_caller]
    fn ok(self) -> Option<Value> {
        assert!(self.success, "plugin failed: {self:#?}");
        self.json
    }

    #[track_caller]
    fn fails_with(&self, code: u64) {
        assert!(
            !self.success,
            "plugin succeeded, expected code {code}: {self:#?}"
        );
        assert_eq!(self.code(), Some(code), "wrong error: {self:#?}");
        let msg = self.json.as_ref().unwrap()["msg"].as_str().unwrap_or("");
        assert!(!msg.is_empty(), "error without a message: {self:#?}");
    }
}

/// One test's world: a named netns standing in for the host (the plugin runs there), pod
/// network namespaces made on demand, and temporary socket, DAN and IPAM directories.
/// Shell run before the plugin to make iproute2 unusable: `$0` is the plugin.
const HIDE_IPROUTE2: &str = "for p in /usr/sbin/ip /usr/bin/ip /sbin/ip /bin/ip; do \
     [ -e \"$p\" ] && mount --bind /dev/null \"$(readlink -f \"$p\")\"; done; \
     if ip -V >/dev/null 2>&1; then exit 97; fi; exec \"$0\"";

struct World {
    ns: String,
    dir: tempfile::TempDir,
    subnet: u8,
    pods: std::sync::Mutex<Vec<String>>,
    /// Runs the plugin where iproute2's `ip` cannot be executed.
    without_iproute2: std::sync::atomic::AtomicBool,
}

impl World {
    fn new(tag: &str, subnet: u8) -> World {
        let ns = format!("vpcni-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let st = Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {ns}");
        let dir = tempfile::Builder::new()
            .prefix("vpcni")
            .tempdir_in("/tmp")
            .unwrap();
        let w = World {
            ns,
            dir,
            subnet,
            pods: Default::default(),
            without_iproute2: Default::default(),
        };
        w.ip(&["link", "set", "lo", "up"]);
        w
    }

    /// A fresh pod network namespace; returns its name (its file is `/run/netns/<name>`).
    fn pod_netns(&self, tag: &str) -> String {
        let ns = format!("vpcni-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let st = Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {ns}");
        self.pods.lock().unwrap().push(ns.clone());
        ns
    }

    /// Runs `ip -n pod ARGS`.
    fn pod_ip(&self, pod: &str, args: &[&str]) -> String {
        ip_in(pod, args)
    }

    /// A Kata runtime-go + QEMU network configuration (tap on the bridge), `extra` merged in.
    fn go_conf(&self, extra: Value) -> Value {
        let mut c = self.conf(json!({"kata": "go"}));
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn dan_dir(&self) -> PathBuf {
        self.dir.path().join("dan")
    }

    fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    fn gateway(&self) -> String {
        format!("10.123.{}.1", self.subnet)
    }

    /// A tap+bridge network configuration, with `extra` keys merged in.
    fn conf(&self, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": "1.1.0",
            "name": "dan-test",
            "type": "vhost-pump-cni",
            "kata": "none",
            "hostPort": {"kind": "tap", "bridge": "br-dan", "isGateway": true},
            "queues": 1,
            "queueSize": 256,
            "mtu": 1500,
            "socketDir": self.socket_dir(),
            "danConfDir": self.dan_dir(),
            "readyTimeoutMs": 20000,
            "ipam": {
                "type": "host-local",
                "dataDir": self.ipam_dir(),
                "ranges": [[{"subnet": format!("10.123.{}.0/24", self.subnet),
                             "gateway": self.gateway()}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    fn ip(&self, args: &[&str]) -> String {
        ip_in(&self.ns, args)
    }

    /// Link names in the netns.
    fn links(&self) -> BTreeSet<String> {
        let v: Value = serde_json::from_str(&self.ip(&["-j", "link", "show"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect()
    }

    fn link(&self, name: &str) -> Value {
        let v: Value =
            serde_json::from_str(&self.ip(&["-j", "-d", "link", "show", "dev", name])).unwrap();
        v[0].clone()
    }

    /// Runs the plugin in the netns with exactly `env` (plus PATH) and `stdin`.
    fn run_raw(&self, env: &[(&str, &str)], stdin: &[u8]) -> Reply {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]);
        if self
            .without_iproute2
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // A private mount namespace where every `ip` binary is /dev/null (exit 97 if one
            // still runs), so the plugin has to do without iproute2.
            cmd.args(["unshare", "-m", "sh", "-c", HIDE_IPROUTE2, PLUGIN]);
        } else {
            cmd.arg(PLUGIN);
        }
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run the plugin");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        Reply {
            success: out.status.success(),
            json: serde_json::from_str(&stdout).ok(),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs STATUS with `conf`.
    fn status(&self, conf: &Value) -> Reply {
        self.run_raw(
            &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", CNI_PATH)],
            conf.to_string().as_bytes(),
        )
    }

    /// Runs `command` for container `cid`, interface `ifname`, with `conf` (`CNI_NETNS` names
    /// a namespace that does not exist: the DAN and plain paths never enter it).
    fn run(&self, command: &str, cid: &str, ifname: &str, conf: &Value) -> Reply {
        self.run_in(
            command,
            cid,
            ifname,
            conf,
            &format!("/var/run/netns/pod-{cid}"),
        )
    }

    /// Runs `command` for container `cid` whose network namespace file is `netns`.
    fn run_in(&self, command: &str, cid: &str, ifname: &str, conf: &Value, netns: &str) -> Reply {
        self.run_raw(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", cid),
                ("CNI_IFNAME", ifname),
                ("CNI_NETNS", netns),
                ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=test"),
                ("CNI_PATH", CNI_PATH),
            ],
            conf.to_string().as_bytes(),
        )
    }

    fn dan_file(&self, sandbox: &str) -> PathBuf {
        self.dan_dir().join(format!("{sandbox}.json"))
    }

    /// The sandbox's DAN file, parsed with the strict Kata mirror.
    fn dan(&self, sandbox: &str) -> KataDanConfig {
        let text = fs::read_to_string(self.dan_file(sandbox)).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("Kata would not parse {text}: {e}"))
    }

    /// Addresses host-local holds.
    fn ipam_allocations(&self) -> Vec<String> {
        fs::read_dir(self.ipam_dir().join("dan-test"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect()
    }

    /// Nothing of any attachment is left: no sidecar, socket, state, DAN file, IP, tap or
    /// macvlan (a bridge is shared and stays).
    #[track_caller]
    fn assert_clean(&self) {
        let sock = self.socket_dir();
        assert!(
            procs_with(&sock.to_string_lossy()).is_empty(),
            "sidecars left running"
        );
        let leftovers: Vec<_> = fs::read_dir(&sock)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n != ".state")
            .collect();
        assert!(leftovers.is_empty(), "left in socketDir: {leftovers:?}");
        let state: Vec<_> = fs::read_dir(sock.join(".state"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        assert!(state.is_empty(), "left in the state directory: {state:?}");
        let dans: Vec<_> = fs::read_dir(self.dan_dir())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        assert!(dans.is_empty(), "left in danConfDir: {dans:?}");
        assert!(self.ipam_allocations().is_empty(), "IPs still allocated");
        let ports: Vec<_> = self
            .links()
            .into_iter()
            .filter(|l| l.starts_with("vp") || l.starts_with("vm"))
            .collect();
        assert!(ports.is_empty(), "host ports left: {ports:?}");
        let kata_dirs: Vec<_> = fs::read_dir("/tmp")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| {
                n.starts_with(&format!("vhostuser_10.123.{}.", self.subnet))
                    || n.starts_with(&format!("vhostuser_fd00:123:{}:", self.subnet))
            })
            .collect();
        assert!(
            kata_dirs.is_empty(),
            "Kata socket directories left: {kata_dirs:?}"
        );
        for pod in self.pods.lock().unwrap().iter() {
            let v: Value =
                serde_json::from_str(&self.pod_ip(pod, &["-j", "link", "show"])).unwrap();
            let links: Vec<&str> = v
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|l| l["ifname"].as_str())
                .filter(|n| *n != "lo")
                .collect();
            assert!(links.is_empty(), "links left in pod netns {pod}: {links:?}");
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Stop whatever still runs in the namespace (sidecars of a failed test), by pid.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2) on a pid living in our private namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        for pod in self.pods.lock().unwrap().iter() {
            let _ = Command::new("ip").args(["netns", "del", pod]).output();
        }
    }
}

/// The interface of a result that carries the socket.
fn guest_iface(result: &Value) -> &Value {
    result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i.get("socketPath").is_some())
        .unwrap_or_else(|| panic!("no interface with socketPath: {result}"))
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn add_check_del_lifecycle() {
    if !can_run("add_check_del_lifecycle") {
        return;
    }
    let w = World::new("life", 1);
    let conf = w.conf(json!({}));
    let cid = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    let result = w
        .run("ADD", cid, "eth0", &conf)
        .ok()
        .expect("ADD prints a result");
    assert_eq!(result["cniVersion"], "1.1.0");
    let g = guest_iface(&result);
    assert_eq!(g["name"], "eth0");
    assert_eq!(g["mtu"], 1500);
    assert_eq!(g["sandbox"], format!("/var/run/netns/pod-{cid}"));
    let mac = g["mac"].as_str().unwrap().to_string();
    let first_octet = u8::from_str_radix(&mac[..2], 16).unwrap();
    assert_eq!(
        first_octet & 0b11,
        0b10,
        "MAC {mac} not locally administered unicast"
    );
    let socket = PathBuf::from(g["socketPath"].as_str().unwrap());
    assert!(socket.starts_with(w.socket_dir()));
    assert!(socket.as_os_str().len() < 108);
    let ip = &result["ips"][0];
    let address = ip["address"].as_str().unwrap().to_string();
    assert!(
        address.starts_with("10.123.1.") && address.ends_with("/24"),
        "{result}"
    );
    assert_eq!(ip["gateway"], w.gateway());
    let guest_index = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .position(|i| i == g)
        .unwrap();
    assert_eq!(ip["interface"], guest_index);
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");
    assert!(result.get("dns").is_some());

    // The sidecar runs and serves the socket; the tap sits on the bridge, which has the gateway.
    assert_eq!(
        procs_with(&format!("--socket {}", socket.display())).len(),
        1
    );
    UnixStream::connect(&socket).expect("socket accepts connections");
    let tap = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .find(|n| n.starts_with("vp"))
        .expect("tap in the result")
        .to_string();
    let link = w.link(&tap);
    assert_eq!(link["master"], "br-dan");
    assert_eq!(link["linkinfo"]["info_kind"], "tun");
    assert!(w
        .ip(&["-o", "addr", "show", "dev", "br-dan"])
        .contains(&format!("{}/24", w.gateway())));

    // "kata": "none" writes no Kata file of any kind.
    assert!(!w.dan_file(cid).exists(), "a DAN file was written");

    // CHECK with the cached result, as runtimes call it.
    let mut check = conf.clone();
    check["prevResult"] = result.clone();
    assert_eq!(w.run("CHECK", cid, "eth0", &check).ok(), None);

    // A second ADD of the same attachment is refused and breaks nothing.
    w.run("ADD", cid, "eth0", &conf).fails_with(104);
    UnixStream::connect(&socket).expect("still served");

    // vhost-pump dies: the supervisor restarts it and CHECK recovers.
    let old = procs_with(&format!("--socket {}", socket.display()));
    // SAFETY: kill(2) on the sidecar's pid.
    unsafe { libc::kill(old[0] as i32, libc::SIGKILL) };
    wait_until("vhost-pump restarted", Duration::from_secs(10), || {
        let now = procs_with(&format!("--socket {}", socket.display()));
        now.len() == 1 && now != old && UnixStream::connect(&socket).is_ok()
    });
    wait_until("CHECK passing again", Duration::from_secs(10), || {
        w.run("CHECK", cid, "eth0", &check).success
    });

    // A prevResult that does not match is reported.
    let mut wrong = check.clone();
    wrong["prevResult"]["interfaces"][guest_index]["mac"] = json!("02:00:00:00:00:99");
    w.run("CHECK", cid, "eth0", &wrong).fails_with(105);

    // DEL, twice; then the attachment is unknown.
    assert_eq!(w.run("DEL", cid, "eth0", &check).ok(), None);
    w.assert_clean();
    assert!(!w.links().contains(&tap));
    assert_eq!(w.run("DEL", cid, "eth0", &conf).ok(), None);
    w.run("CHECK", cid, "eth0", &check).fails_with(3);
    w.assert_clean();
}

#[test]
fn answers_in_the_version_asked() {
    if !can_run("answers_in_the_version_asked") {
        return;
    }
    let w = World::new("ver", 2);
    for (version, socket_path, ip_version) in [
        ("0.4.0", false, true),
        ("1.0.0", false, false),
        ("1.1.0", true, false),
    ] {
        let conf = w.conf(json!({"cniVersion": version}));
        let cid = format!("v{}", version.replace('.', ""));
        let r = w.run("ADD", &cid, "eth0", &conf).ok().unwrap();
        assert_eq!(r["cniVersion"], version);
        let g = r["interfaces"].as_array().unwrap().last().unwrap();
        assert_eq!(g["name"], "eth0");
        assert_eq!(g.get("socketPath").is_some(), socket_path, "{version}: {r}");
        assert_eq!(g.get("mtu").is_some(), socket_path, "{version}: {r}");
        assert_eq!(
            r["ips"][0].get("version").is_some(),
            ip_version,
            "{version}: {r}"
        );
        let mut check = conf.clone();
        check["prevResult"] = r;
        assert_eq!(w.run("CHECK", &cid, "eth0", &check).ok(), None, "{version}");
        assert_eq!(w.run("DEL", &cid, "eth0", &check).ok(), None);
    }
    w.assert_clean();
}

#[test]
fn version_status_and_bad_inputs() {
    if !can_run("version_status_and_bad_inputs") {
        return;
    }
    let w = World::new("bad", 3);
    let conf = w.conf(json!({}));

    let v = w
        .run_raw(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.0.0"}"#)
        .ok()
        .unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    let supported: Vec<&str> = v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for want in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(supported.contains(&want), "{v}");
    }

    let status = |c: &Value| w.status(c);
    assert_eq!(status(&conf).ok(), None);
    let mut explicit = conf.clone();
    explicit["vhostPumpPath"] = json!(DAEMON);
    assert_eq!(status(&explicit).ok(), None);
    let mut no_daemon = conf.clone();
    no_daemon["vhostPumpPath"] = json!("/nonexistent/vhost-pump");
    let r = status(&no_daemon);
    r.fails_with(50);
    assert!(r.stdout.contains("vhost-pump"), "{r:?}");
    let mut no_ipam = conf.clone();
    no_ipam["ipam"]["type"] = json!("no-such-ipam");
    status(&no_ipam).fails_with(50);
    let mut no_master = conf.clone();
    no_master["hostPort"] = json!({"kind": "af-packet", "master": "nosuchif0"});
    status(&no_master).fails_with(50);

    let good_env = |cmd: &'static str| {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "bad-inputs"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_PATH", CNI_PATH),
        ]
    };
    let stdin = conf.to_string();
    let without = |k: &str| -> Vec<(&str, &str)> {
        good_env("ADD")
            .into_iter()
            .filter(|(n, _)| *n != k)
            .collect()
    };
    for k in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_IFNAME",
        "CNI_NETNS",
        "CNI_PATH",
    ] {
        let r = w.run_raw(&without(k), stdin.as_bytes());
        r.fails_with(4);
        assert!(
            r.json.as_ref().unwrap()["msg"]
                .as_str()
                .unwrap()
                .contains(k),
            "{r:?}"
        );
    }
    let mut bad_cid = good_env("ADD");
    bad_cid[1].1 = "../../etc/passwd";
    w.run_raw(&bad_cid, stdin.as_bytes()).fails_with(4);
    let mut bad_cmd = good_env("ADD");
    bad_cmd[0].1 = "FROB";
    w.run_raw(&bad_cmd, stdin.as_bytes()).fails_with(4);

    w.run_raw(&good_env("ADD"), b"{ this is not json")
        .fails_with(6);
    w.run_raw(&good_env("ADD"), b"").fails_with(6);

    let bad = |extra: Value| w.conf(extra).to_string();
    for (stdin, code) in [
        (bad(json!({"queues": 0})), 7),
        (bad(json!({"queueSize": 100})), 7),
        (bad(json!({"mtu": "big"})), 7),
        (bad(json!({"hostPort": {"kind": "tap"}})), 7),
        (bad(json!({"socketDir": "relative"})), 7),
        (
            bad(json!({"socketDir": format!("/{}", "x".repeat(100))})),
            7,
        ),
        (
            bad(json!({"hostPort": {"kind": "vfio", "device": "0000:00:01.0"}})),
            2,
        ),
        (
            bad(json!({"hostPort": {"kind": "tap", "bridge": "b0", "vlan": 5}})),
            2,
        ),
        (bad(json!({"vhostUserMode": "both"})), 2),
        (bad(json!({"kata": "clh"})), 2),
        (bad(json!({"kata": "go", "vhostUserMode": "client"})), 7),
        (bad(json!({"kata": "go", "queues": 2})), 7),
        (bad(json!({"kata": "rs", "vhostUserMode": "server"})), 7),
        (bad(json!({"daemon": {"control": "relative.sock"}})), 7),
        (bad(json!({"cniVersion": "0.2.0"})), 1),
        (bad(json!({"cniVersion": "2.0.0"})), 1),
    ] {
        let r = w.run_raw(&good_env("ADD"), stdin.as_bytes());
        r.fails_with(code);
        assert_eq!(
            r.json.as_ref().unwrap()["cniVersion"]
                .as_str()
                .map(|v| v.len()),
            Some(5)
        );
    }
    // CHECK is not part of 0.3.x.
    w.run_raw(
        &good_env("CHECK"),
        bad(json!({"cniVersion": "0.3.1"})).as_bytes(),
    )
    .fails_with(1);
    // GC without its list.
    w.run_raw(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", CNI_PATH)],
        stdin.as_bytes(),
    )
    .fails_with(7);

    // A sidecar that cannot start: ADD fails with our code and rolls everything back.
    let r = w.run_raw(
        &good_env("ADD"),
        bad(json!({"vhostPumpPath": "/bin/false"})).as_bytes(),
    );
    r.fails_with(102);
    // An IPAM failure (exhausted one-address range) is passed on.
    let tiny = w.conf(json!({"ipam": {"type": "host-local", "dataDir": w.ipam_dir(),
        "ranges": [[{"subnet": "10.123.3.0/30", "rangeStart": "10.123.3.2", "rangeEnd": "10.123.3.2"}]]}}));
    w.run("ADD", "holder", "eth0", &tiny).ok();
    let r = w.run("ADD", "starved", "eth0", &tiny);
    assert!(!r.success && r.stdout.contains("host-local"), "{r:?}");
    w.run("DEL", "holder", "eth0", &tiny).ok();
    // DEL of something never added, and with a garbage container id.
    assert_eq!(w.run("DEL", "never-added", "eth0", &conf).ok(), None);
    w.assert_clean();
}

#[test]
fn gc_removes_stale_attachments() {
    if !can_run("gc_removes_stale_attachments") {
        return;
    }
    let w = World::new("gc", 4);
    let conf = w.conf(json!({}));
    let keep = w.run("ADD", "keep", "eth0", &conf).ok().unwrap();
    let stale = w.run("ADD", "stale", "eth0", &conf).ok().unwrap();
    let stale_socket = guest_iface(&stale)["socketPath"]
        .as_str()
        .unwrap()
        .to_string();
    let keep_socket = guest_iface(&keep)["socketPath"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(w.ipam_allocations().len(), 2);

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let r = w.run_raw(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", CNI_PATH)],
        gc.to_string().as_bytes(),
    );
    assert_eq!(r.ok(), None);

    assert!(
        procs_with(&stale_socket).is_empty(),
        "stale sidecar still runs"
    );
    assert!(!Path::new(&stale_socket).exists());
    assert!(!w.dan_file("stale").exists());
    assert_eq!(w.ipam_allocations().len(), 1);
    assert_eq!(w.links().iter().filter(|l| l.starts_with("vp")).count(), 1);

    // The valid attachment is untouched.
    UnixStream::connect(&keep_socket).unwrap();
    let mut check = conf.clone();
    check["prevResult"] = keep;
    assert_eq!(w.run("CHECK", "keep", "eth0", &check).ok(), None);
    // GC of another network leaves ours alone.
    let mut other = gc.clone();
    other["name"] = json!("other-net");
    other["cni.dev/valid-attachments"] = json!([]);
    assert_eq!(
        w.run_raw(
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", CNI_PATH)],
            other.to_string().as_bytes()
        )
        .ok(),
        None
    );
    UnixStream::connect(&keep_socket).unwrap();
    assert_eq!(w.run("DEL", "keep", "eth0", &conf).ok(), None);
    w.assert_clean();
}

#[test]
fn concurrent_adds_get_distinct_ports_and_merged_files() {
    if !can_run("concurrent_adds_get_distinct_ports_and_merged_files") {
        return;
    }
    let w = World::new("many", 5);
    // Kata runtime-rs: every sandbox's interfaces meet in one DAN file.
    let conf = w.conf(json!({"kata": "rs"}));
    // 20 sandboxes; the first two get a second interface: 22 ADDs at once.
    let mut jobs: Vec<(String, &str)> = (0..20).map(|i| (format!("sb{i:02}"), "eth0")).collect();
    jobs.push(("sb00".into(), "eth1"));
    jobs.push(("sb01".into(), "eth1"));
    let t = Instant::now();
    let results: Vec<(String, &str, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(cid, ifname)| {
                let (w, conf) = (&w, &conf);
                s.spawn(move || {
                    let r = w.run("ADD", cid, ifname, conf).ok().unwrap();
                    (cid.clone(), *ifname, r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("22 concurrent ADDs took {:.2?}", t.elapsed());

    let ips: BTreeSet<String> = results
        .iter()
        .map(|(_, _, r)| r["ips"][0]["address"].as_str().unwrap().to_string())
        .collect();
    let sockets: BTreeSet<String> = results
        .iter()
        .map(|(_, _, r)| guest_iface(r)["socketPath"].as_str().unwrap().to_string())
        .collect();
    let macs: BTreeSet<String> = results
        .iter()
        .map(|(_, _, r)| guest_iface(r)["mac"].as_str().unwrap().to_string())
        .collect();
    assert_eq!((ips.len(), sockets.len(), macs.len()), (22, 22, 22));
    let taps = w
        .links()
        .into_iter()
        .filter(|l| l.starts_with("vp"))
        .count();
    assert_eq!(taps, 22);
    // Each socket has its own vhost-pump, dialling it (Dragonball would listen there).
    for s in &sockets {
        assert_eq!(procs_with(&format!("--socket {s} ")).len(), 1, "{s}");
        assert!(!Path::new(s).exists(), "{s} made by the backend");
    }
    // One file per sandbox; two entries where two interfaces were added.
    assert_eq!(
        fs::read_dir(w.dan_dir())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "json")
            })
            .count(),
        20
    );
    for (cid, _, _) in &results {
        let dan = w.dan(cid);
        let names: Vec<&str> = dan.devices.iter().map(|d| d.name.as_str()).collect();
        let want: &[&str] = if cid == "sb00" || cid == "sb01" {
            &["eth0", "eth1"]
        } else {
            &["eth0"]
        };
        assert_eq!(names, want, "{cid}");
        for d in &dan.devices {
            let (_, _, r) = results
                .iter()
                .find(|(c, i, _)| c == cid && *i == d.name)
                .unwrap();
            assert_eq!(d.guest_mac, guest_iface(r)["mac"].as_str().unwrap());
        }
    }

    // Concurrent DELs, including both interfaces of the merged sandboxes.
    std::thread::scope(|s| {
        for (cid, ifname) in &jobs {
            let (w, conf) = (&w, &conf);
            s.spawn(move || assert_eq!(w.run("DEL", cid, ifname, conf).ok(), None));
        }
    });
    w.assert_clean();
}

#[test]
fn client_mode_dials_the_vmm_socket() {
    if !can_run("client_mode_dials_the_vmm_socket") {
        return;
    }
    let w = World::new("cli", 6);
    // Kata runtime-rs + Dragonball: client mode is the default there.
    let conf = w.conf(json!({"kata": "rs", "queues": 2, "socketMode": "0600",
               "runtimeConfig": {"mac": "02:11:22:33:44:55"}}));
    let r = w.run("ADD", "dragonball", "eth0", &conf).ok().unwrap();
    assert_eq!(
        guest_iface(&r)["mac"],
        "02:11:22:33:44:55",
        "runtimeConfig.mac is used"
    );
    assert_eq!(
        w.dan("dragonball").devices[0].guest_mac,
        "02:11:22:33:44:55"
    );
    let socket = PathBuf::from(guest_iface(&r)["socketPath"].as_str().unwrap());
    // The VMM creates the socket (Dragonball refuses an existing path): nothing there yet, but
    // its directory is ready for the VMM's user.
    assert!(!socket.exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    let tap = r["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .find(|n| n.starts_with("vp"))
        .expect("tap in the result")
        .to_string();
    let link = w.link(&tap);
    assert!(link["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    match &w.dan("dragonball").devices[0].device {
        KataDevice::VhostUser {
            path, queue_num, ..
        } => {
            assert_eq!(Path::new(path), socket);
            assert_eq!(*queue_num, 2);
        }
        other => panic!("{other:?}"),
    }
    // Act as the VMM: listen on the path; the sidecar dials in.
    let vmm = UnixListener::bind(&socket).unwrap();
    vmm.set_nonblocking(true).unwrap();
    wait_until("the sidecar connecting", Duration::from_secs(10), || {
        vmm.accept().is_ok()
    });
    let mut check = conf.clone();
    check["prevResult"] = r;
    assert_eq!(w.run("CHECK", "dragonball", "eth0", &check).ok(), None);
    drop(vmm);
    assert_eq!(w.run("DEL", "dragonball", "eth0", &conf).ok(), None);
    w.assert_clean();
}

#[test]
fn af_packet_on_a_macvlan() {
    if !can_run("af_packet_on_a_macvlan") {
        return;
    }
    let w = World::new("afp", 7);
    w.without_iproute2
        .store(true, std::sync::atomic::Ordering::Relaxed);
    w.ip(&[
        "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
    ]);
    w.ip(&["link", "set", "uplink0", "up"]);
    let conf = w.conf(json!({"hostPort": {"kind": "af-packet", "master": "uplink0"}}));
    let r = w.run("ADD", "afp", "eth0", &conf);
    if r.success {
        let result = r.json.unwrap();
        let mac = guest_iface(&result)["mac"].as_str().unwrap().to_string();
        let mv = w
            .links()
            .into_iter()
            .find(|l| l.starts_with("vm"))
            .expect("a macvlan");
        let link = w.link(&mv);
        assert_eq!(link["linkinfo"]["info_kind"], "macvlan");
        assert_eq!(
            link["address"],
            mac.as_str(),
            "the macvlan carries the guest MAC"
        );
        let socket = guest_iface(&result)["socketPath"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(UnixStream::connect(&socket).is_ok());
        // The plugin knows the guest MAC, so the kernel drops other hosts' unicast for us.
        let with_filter = procs_with("--mac-filter")
            .into_iter()
            .filter(|p| procs_with(&format!("--socket {socket} ")).contains(p))
            .count();
        assert_eq!(with_filter, 1, "the sidecar runs without --mac-filter");
        let secured = procs_with("--port-security")
            .into_iter()
            .filter(|p| procs_with(&format!("--socket {socket} ")).contains(p))
            .count();
        assert_eq!(secured, 1, "CNI ports are port-secured by default");
        assert_eq!(w.run("DEL", "afp", "eth0", &conf).ok(), None);
    } else {
        // vhost-pump without AF_PACKET support: the failure is reported and rolled back.
        eprintln!("af-packet ADD failed (rolled back): {}", r.stdout);
        r.fails_with(102);
    }
    w.assert_clean();
    assert!(
        w.links().contains("uplink0"),
        "the master must never be removed"
    );
}

/// What Kata runtime-go's netns scan turns into a vhost-user endpoint, found the way it looks:
/// every link but `lo` that is not a physical NIC, for each address A the socket
/// `/tmp/vhostuser_<A>/vhu.sock`; then the link's MAC, MTU, addresses and routes for the guest.
#[derive(Debug)]
struct KataEndpoint {
    ifname: String,
    kind: String,
    mac: String,
    mtu: u32,
    address: String,
    socket: PathBuf,
    gateway: Option<String>,
    /// `IFF_NOARP`, which Kata copies to the guest interface.
    noarp: bool,
}

fn kata_go_scan(w: &World, pod: &str) -> Vec<KataEndpoint> {
    let links: Value =
        serde_json::from_str(&w.pod_ip(pod, &["-j", "-d", "address", "show"])).unwrap();
    let mut found = Vec::new();
    for l in links.as_array().unwrap() {
        let ifname = l["ifname"].as_str().unwrap().to_string();
        // A physical NIC has no link kind; Kata skips it (and `lo`).
        let Some(kind) = l["linkinfo"]["info_kind"].as_str() else {
            continue;
        };
        if ifname == "lo" {
            continue;
        }
        for a in l["addr_info"].as_array().into_iter().flatten() {
            let local = a["local"].as_str().unwrap();
            let socket = PathBuf::from(format!("/tmp/vhostuser_{local}/vhu.sock"));
            if !socket.exists() {
                continue;
            }
            let family = if local.contains(':') { "-6" } else { "-4" };
            let routes: Value = serde_json::from_str(
                &w.pod_ip(pod, &["-j", family, "route", "show", "dev", &ifname]),
            )
            .unwrap();
            let gateway = routes
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["dst"] == "default")
                .and_then(|r| r["gateway"].as_str())
                .map(String::from);
            found.push(KataEndpoint {
                ifname: ifname.clone(),
                kind: kind.to_string(),
                mac: l["address"].as_str().unwrap().to_string(),
                mtu: l["mtu"].as_u64().unwrap() as u32,
                address: format!("{local}/{}", a["prefixlen"]),
                socket,
                gateway,
                noarp: l["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f == "NOARP")),
            });
            break;
        }
    }
    found
}

/// Starts QEMU with Kata runtime-go's arguments for `ep` and waits for the guest.
fn kata_go_guest(ep: &KataEndpoint, name: &str) -> QemuGuest {
    let mut opts = GuestOpts::vhost_user(&ep.socket, 1);
    opts.kata_go = true;
    opts.mac = ep.mac.clone();
    opts.ip = Some(ep.address.clone());
    opts.gateway = ep.gateway.clone();
    opts.mtu = Some(ep.mtu);
    opts.name = name.into();
    let mut vm = QemuGuest::start(&opts).expect("start QEMU");
    let boot = vm.wait_ready(Duration::from_secs(90)).expect("guest ready");
    eprintln!(
        "{name}: guest ready after {boot:.2?}; QEMU {}; logs in {}",
        vm.command_line(),
        vm.log_dir().display()
    );
    // Kata's agent gives the guest interface the link's NOARP flag.
    if ep.noarp {
        vm.run_ok("ip link set dev eth0 arp off", Duration::from_secs(10))
            .unwrap();
    }
    vm
}

/// Pings `target` from the guest (a few tries: a new IPv6 address needs its DAD first);
/// returns the average round trip in ms.
#[track_caller]
fn guest_pings(vm: &mut QemuGuest, target: &str) -> f64 {
    let mut last = String::new();
    for _ in 0..5 {
        let out = vm
            .run(&format!("ping -c 3 -W 5 {target}"), Duration::from_secs(60))
            .unwrap();
        if out.contains(" 0% packet loss") {
            // round-trip min/avg/max = 0.421/0.512/0.630 ms
            return out
                .lines()
                .find_map(|l| l.split(" = ").nth(1))
                .and_then(|v| v.split('/').nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
        }
        last = out.output;
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("ping {target} failed:\n{last}");
}

/// TCP throughput guest → host side over the attachment: iperf3 in the world netns on
/// `server`, the guest sending for 3 s. Mbit/s.
fn guest_iperf(w: &World, vm: &mut QemuGuest, server: &str) -> f64 {
    let mut srv = Command::new("ip")
        .args(["netns", "exec", &w.ns, "iperf3", "-s", "-1", "-B", server])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    let out = vm
        .run(
            &format!("iperf3 -c {server} -t 3 -f m"),
            Duration::from_secs(60),
        )
        .unwrap();
    let _ = srv.kill();
    let _ = srv.wait();
    guest::iperf_mbps(&out).unwrap_or_else(|| panic!("iperf3 output:\n{}", out.output))
}

#[test]
fn kata_go_qemu_finds_link_and_socket_and_pings_the_gateway() {
    let test = "kata_go_qemu_finds_link_and_socket_and_pings_the_gateway";
    if !can_boot(test) {
        return;
    }
    let w = World::new("go", 9);
    let pod = w.pod_netns("go-pod");
    let netns = format!("/run/netns/{pod}");
    let conf = w.go_conf(json!({}));
    let r = w
        .run_in("ADD", "gosandbox", "eth0", &conf, &netns)
        .ok()
        .unwrap();
    let g = guest_iface(&r);
    assert_eq!(g["sandbox"], netns.as_str());
    let address = r["ips"][0]["address"].as_str().unwrap().to_string();
    let ip = address.split('/').next().unwrap();
    let socket = PathBuf::from(format!("/tmp/vhostuser_{ip}/vhu.sock"));
    assert_eq!(Path::new(g["socketPath"].as_str().unwrap()), socket);

    // What Kata runtime-go's scan finds: exactly one endpoint, ours.
    let eps = kata_go_scan(&w, &pod);
    assert_eq!(eps.len(), 1, "{eps:?}");
    let ep = &eps[0];
    assert_eq!(ep.ifname, "eth0");
    // A dummy, or an ifb where the kernel has no dummy driver (as on the CI machines).
    assert!(["dummy", "ifb"].contains(&ep.kind.as_str()), "{ep:?}");
    assert!(!ep.noarp, "Kata would turn ARP off in the guest: {ep:?}");
    assert_eq!(ep.mac, g["mac"].as_str().unwrap());
    assert_eq!((ep.mtu, ep.address.as_str()), (1500, address.as_str()));
    assert_eq!(ep.socket, socket);
    assert_eq!(ep.gateway.as_deref(), Some(w.gateway().as_str()));
    // The backend listens before ADD returns, in a 0700 directory, on a 0660 socket.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    assert_eq!(mode(&socket), 0o660);
    assert_eq!(
        procs_with(&format!("--socket {} ", socket.display())).len(),
        1
    );
    // Runtime-go reads no DAN file: none is written.
    assert!(!w.dan_file("gosandbox").exists());

    let mut check = conf.clone();
    check["prevResult"] = r.clone();
    let check_go = || w.run_in("CHECK", "gosandbox", "eth0", &check, &netns);
    assert_eq!(check_go().ok(), None);

    // QEMU exactly as Kata starts it, the guest configured from the netns link.
    let mut vm = kata_go_guest(ep, "kata-go");
    let rtt = guest_pings(&mut vm, &w.gateway());
    let mac = vm
        .run_ok("cat /sys/class/net/eth0/address", Duration::from_secs(10))
        .unwrap();
    assert_eq!(mac.trim(), ep.mac);
    let mbps = guest_iperf(&w, &mut vm, &w.gateway());
    eprintln!("FIGURE kata go (runtime-go + QEMU, tap, sidecar): ping {rtt:.3} ms, guest→host TCP {mbps:.0} Mbit/s (TCG guest)");
    assert_eq!(check_go().ok(), None, "CHECK with QEMU connected");

    // A CHECK that finds the link changed says so.
    w.pod_ip(&pod, &["link", "set", "dev", "eth0", "mtu", "1400"]);
    let bad = check_go();
    bad.fails_with(105);
    assert!(bad.stdout.contains("MTU 1400"), "{bad:?}");
    w.pod_ip(&pod, &["link", "set", "dev", "eth0", "mtu", "1500"]);
    assert_eq!(check_go().ok(), None);

    // The backend dies under a QEMU that does not reconnect: the supervisor brings the socket
    // back, and both it and CHECK say that the pod's network is gone.
    let needle = format!("--socket {} ", socket.display());
    let old = procs_with(&needle);
    // SAFETY: kill(2) on the sidecar's pid.
    unsafe { libc::kill(old[0] as i32, libc::SIGKILL) };
    wait_until("vhost-pump restarted", Duration::from_secs(10), || {
        let now = procs_with(&needle);
        now.len() == 1 && now != old && UnixStream::connect(&socket).is_ok()
    });
    let lost = check_go();
    lost.fails_with(105);
    assert!(lost.stdout.contains("does not reconnect"), "{lost:?}");
    let log = w
        .socket_dir()
        .join(".state")
        .read_dir()
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| fs::read_to_string(e.path()).unwrap())
        .unwrap();
    assert!(log.contains("does not reconnect"), "supervisor log:\n{log}");
    drop(vm);

    assert_eq!(
        w.run_in("DEL", "gosandbox", "eth0", &conf, &netns).ok(),
        None
    );
    assert!(!socket.parent().unwrap().exists());
    w.assert_clean();
    assert_eq!(
        w.run_in("DEL", "gosandbox", "eth0", &conf, &netns).ok(),
        None
    );
}

#[test]
fn kata_go_ipv6_only() {
    let test = "kata_go_ipv6_only";
    if !can_run(test) {
        return;
    }
    let w = World::new("go6", 11);
    // Every plugin run below happens without iproute2: links, addresses and routes go over
    // netlink.
    w.without_iproute2
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let pod = w.pod_netns("go6-pod");
    let netns = format!("/run/netns/{pod}");
    let conf = w.go_conf(json!({"ipam": {
        "type": "host-local",
        "dataDir": w.ipam_dir(),
        "ranges": [[{"subnet": "fd00:123:11::/64", "gateway": "fd00:123:11::1"}]],
        "routes": [{"dst": "::/0"}],
    }}));
    assert_eq!(w.status(&conf).ok(), None, "STATUS needs no iproute2");
    let r = w.run_in("ADD", "go6", "eth0", &conf, &netns).ok().unwrap();
    let address = r["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(address.starts_with("fd00:123:11::"), "{r}");
    let eps = kata_go_scan(&w, &pod);
    assert_eq!(eps.len(), 1, "Kata must find the IPv6 socket: {eps:?}");
    let ip = address.split('/').next().unwrap();
    assert_eq!(
        eps[0].socket,
        Path::new(&format!("/tmp/vhostuser_{ip}/vhu.sock"))
    );
    assert_eq!(eps[0].gateway.as_deref(), Some("fd00:123:11::1"));
    // Not tentative: Kata and the guest get a usable address at once.
    let shown = w.pod_ip(&pod, &["-6", "address", "show", "dev", "eth0"]);
    assert!(!shown.contains("tentative"), "{shown}");
    let mut check = conf.clone();
    check["prevResult"] = r;
    assert_eq!(w.run_in("CHECK", "go6", "eth0", &check, &netns).ok(), None);
    if guest::missing_prereqs().is_none() {
        let mut vm = kata_go_guest(&eps[0], "kata-go-v6");
        let rtt = guest_pings(&mut vm, "fd00:123:11::1");
        eprintln!("FIGURE kata go IPv6-only: ping {rtt:.3} ms");
    } else if let Some(why) = guest::missing_prereqs() {
        guest::skip_or_fail(test, &why);
    }
    assert_eq!(w.run_in("DEL", "go6", "eth0", &conf, &netns).ok(), None);
    w.assert_clean();
}

#[test]
fn kata_rs_qemu_listens_and_the_backend_dials() {
    let test = "kata_rs_qemu_listens_and_the_backend_dials";
    if !can_boot(test) {
        return;
    }
    let w = World::new("vm", 8);
    // Server mode cannot work with Dragonball, which creates the socket itself.
    let r = w.run(
        "ADD",
        "rs-server",
        "eth0",
        &w.conf(json!({"kata": "rs", "vhostUserMode": "server"})),
    );
    r.fails_with(7);
    assert!(r.stdout.contains("Dragonball"), "{r:?}");

    let conf = w.conf(json!({"kata": "rs"}));
    let r = w.run("ADD", "vm-sandbox", "eth0", &conf).ok().unwrap();
    let dan = w.dan("vm-sandbox");
    let d = &dan.devices[0];
    let KataDevice::VhostUser {
        path,
        queue_num,
        queue_size,
    } = &d.device
    else {
        panic!("not a vhost-user device: {d:?}");
    };
    // The entry as Kata reads it: socket, queues, MAC, address, MTU, routes, no neighbours.
    assert_eq!(
        Path::new(path),
        Path::new(guest_iface(&r)["socketPath"].as_str().unwrap())
    );
    assert_eq!((*queue_num, *queue_size), (1, 256));
    assert_eq!(d.name, "eth0");
    assert_eq!(d.guest_mac, guest_iface(&r)["mac"].as_str().unwrap());
    assert_eq!(
        d.network_info.interface.ip_addresses,
        [r["ips"][0]["address"].as_str().unwrap()]
    );
    assert_eq!(d.network_info.interface.mtu, 1500);
    assert!(d.network_info.neighbors.is_empty());
    assert_eq!(
        dan.netns.as_deref(),
        Some(format!("/run/netns/{}", w.ns).as_str())
    );
    let route = &d.network_info.routes[0];
    assert_eq!(
        (route.dest.as_str(), route.gateway.as_str()),
        ("0.0.0.0/0", w.gateway().as_str())
    );
    assert_eq!((route.source.as_str(), route.scope), ("", 0));
    // Kata runtime-rs refuses a socket path that exists: the backend must not create it.
    assert!(!Path::new(path).exists());

    // QEMU listens on the socket, as Dragonball does; vhost-pump dials in.
    let mut opts = GuestOpts::vhost_user(path, 1);
    opts.vhost_user_server = true;
    opts.mac = d.guest_mac.clone();
    opts.ip = Some(d.network_info.interface.ip_addresses[0].clone());
    opts.gateway = Some(route.gateway.clone());
    opts.mtu = Some(d.network_info.interface.mtu as u32);
    opts.name = "kata-rs".into();
    let mut vm = QemuGuest::start(&opts).expect("start QEMU");
    let boot = vm.wait_ready(Duration::from_secs(90)).expect("guest ready");
    eprintln!(
        "guest ready after {boot:.2?}; logs in {}",
        vm.log_dir().display()
    );
    let rtt = guest_pings(&mut vm, &w.gateway());
    let mac = vm
        .run_ok("cat /sys/class/net/eth0/address", Duration::from_secs(10))
        .unwrap();
    assert_eq!(mac.trim(), guest_iface(&r)["mac"].as_str().unwrap());
    let mbps = guest_iperf(&w, &mut vm, &w.gateway());
    eprintln!("FIGURE kata rs (runtime-rs + Dragonball stand-in, tap, sidecar): ping {rtt:.3} ms, guest→host TCP {mbps:.0} Mbit/s (TCG guest)");
    let mut check = conf.clone();
    check["prevResult"] = r;
    assert_eq!(w.run("CHECK", "vm-sandbox", "eth0", &check).ok(), None);
    drop(vm);
    assert_eq!(w.run("DEL", "vm-sandbox", "eth0", &conf).ok(), None);
    w.assert_clean();
}

/// One request on the node daemon's control socket.
fn node_request(control: &Path, req: &Value) -> Value {
    use std::io::{BufRead, BufReader};
    let mut s = UnixStream::connect(control).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// GET /metrics from the daemon's Unix-socket metrics endpoint.
fn metrics_text(sock: &Path) -> String {
    use std::io::Read;
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn node_daemon_serves_two_pods() {
    let test = "node_daemon_serves_two_pods";
    if !can_boot(test) {
        return;
    }
    let w = World::new("node", 10);
    let control = w.dir.path().join("node.sock");
    let metrics = w.dir.path().join("metrics.sock");
    let state_file = w.dir.path().join("node-ports.toml");
    let start_daemon = || {
        let d = Command::new("ip")
            .args(["netns", "exec", &w.ns, DAEMON, "--control"])
            .arg(&control)
            .arg("--metrics")
            .arg(format!("unix:{}", metrics.display()))
            .arg("--state-file")
            .arg(&state_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("the node daemon", Duration::from_secs(10), || {
            UnixStream::connect(&control).is_ok() && UnixStream::connect(&metrics).is_ok()
        });
        d
    };
    let mut daemon = start_daemon();
    let conf = w.go_conf(json!({"daemon": {"control": control}}));
    // STATUS sees the daemon.
    assert_eq!(w.status(&conf).ok(), None);

    let mut pods = Vec::new();
    for name in ["pod-a", "pod-b"] {
        let ns = w.pod_netns(&format!("node-{name}"));
        let netns = format!("/run/netns/{ns}");
        let r = w.run_in("ADD", name, "eth0", &conf, &netns).ok().unwrap();
        let socket = guest_iface(&r)["socketPath"].as_str().unwrap().to_string();
        // No sidecar: the node daemon serves the socket.
        assert!(procs_with(&format!("--socket {socket} ")).is_empty());
        let eps = kata_go_scan(&w, &ns);
        assert_eq!(eps.len(), 1, "{eps:?}");
        pods.push((name, ns, netns, r, eps.into_iter().next().unwrap()));
    }
    // The daemon's port of each pod, by socket; both in the one metrics endpoint.
    let port_of = |socket: &str| -> String {
        let list = node_request(&control, &json!({"op": "list"}));
        list["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["socket"] == socket)
            .unwrap_or_else(|| panic!("no port for {socket}: {list}"))["name"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let ports: Vec<String> = pods
        .iter()
        .map(|(_, _, _, r, _)| port_of(guest_iface(r)["socketPath"].as_str().unwrap()))
        .collect();
    let text = metrics_text(&metrics);
    for p in &ports {
        assert!(
            text.contains(&format!("vhost_pump_port_connected{{port=\"{p}\"}}")),
            "{p} missing from the metrics:\n{text}"
        );
    }
    let mut vms: Vec<QemuGuest> = pods
        .iter()
        .map(|(name, _, _, _, ep)| kata_go_guest(ep, &format!("node-{name}")))
        .collect();
    for (vm, (name, ..)) in vms.iter_mut().zip(&pods) {
        let rtt = guest_pings(vm, &w.gateway());
        eprintln!("FIGURE node daemon, {name}: ping {rtt:.3} ms");
    }
    let mbps = guest_iperf(&w, &mut vms[0], &w.gateway());
    eprintln!(
        "FIGURE node daemon (runtime-go + QEMU, tap): guest→host TCP {mbps:.0} Mbit/s (TCG guest)"
    );
    let text = metrics_text(&metrics);
    for p in &ports {
        let frames: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("vhost_pump_frames_total") && l.contains(&format!("port=\"{p}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(frames > 0.0, "no frames counted for {p}:\n{text}");
    }
    for (name, _, netns, r, _) in &pods {
        let mut check = conf.clone();
        check["prevResult"] = r.clone();
        assert_eq!(w.run_in("CHECK", name, "eth0", &check, netns).ok(), None);
    }

    // DEL of one pod leaves the other running.
    let (name, _, netns, _, _) = &pods[0];
    drop(vms.remove(0));
    assert_eq!(w.run_in("DEL", name, "eth0", &conf, netns).ok(), None);
    let left = metrics_text(&metrics);
    assert!(
        !left.contains(&format!("port=\"{}\"", ports[0]))
            || !left.contains(&format!("port=\"{}\"", ports[1]))
    );
    guest_pings(&mut vms[0], &w.gateway());
    let (name_b, _, netns_b, r_b, _) = &pods[1];
    let mut check = conf.clone();
    check["prevResult"] = r_b.clone();
    assert_eq!(
        w.run_in("CHECK", name_b, "eth0", &check, netns_b).ok(),
        None
    );

    // The node daemon restarts (an upgrade): the remembered port comes back, the deleted one
    // does not; pod b's QEMU cannot reconnect, and CHECK says so.
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    daemon.wait().unwrap();
    daemon = start_daemon();
    let names: Vec<String> = node_request(&control, &json!({"op": "list"}))["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, [ports[1].clone()], "restored ports");
    let lost = w.run_in("CHECK", name_b, "eth0", &check, netns_b);
    lost.fails_with(105);
    assert!(lost.stdout.contains("does not reconnect"), "{lost:?}");
    drop(vms);
    assert_eq!(w.run_in("DEL", name_b, "eth0", &conf, netns_b).ok(), None);
    assert!(
        !fs::read_to_string(&state_file).unwrap().contains("cni-"),
        "DEL left the port in the state file"
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    w.assert_clean();
}

#[test]
fn kata_go_leaves_what_is_not_its_own() {
    if !can_run("kata_go_leaves_what_is_not_its_own") {
        return;
    }
    let w = World::new("own", 12);
    // host-local hands out .2 first from a fresh data directory (one per step: it moves on
    // after a release).
    let conf_in = |dir: &str| {
        let mut c = w.go_conf(json!({}));
        c["ipam"]["dataDir"] = json!(w.dir.path().join(dir));
        c
    };
    let kata_dir = PathBuf::from("/tmp/vhostuser_10.123.12.2");
    for e in fs::read_dir("/tmp").unwrap().filter_map(|e| e.ok()) {
        if e.file_name()
            .to_string_lossy()
            .starts_with("vhostuser_10.123.12.")
        {
            let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
        }
    }

    // 1. The pod netns already has the interface: refused, and that link survives.
    let pod = w.pod_netns("own-pod");
    let netns = format!("/run/netns/{pod}");
    w.pod_ip(
        &pod,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ],
    );
    let r = w.run_in("ADD", "own1", "eth0", &conf_in("ipam1"), &netns);
    r.fails_with(106);
    let v: Value =
        serde_json::from_str(&w.pod_ip(&pod, &["-j", "-d", "link", "show", "dev", "eth0"]))
            .unwrap();
    assert_eq!(
        v[0]["linkinfo"]["info_kind"], "veth",
        "someone else's eth0 was touched"
    );
    w.pod_ip(&pod, &["link", "del", "eth0"]);

    // 2. Another backend listens where Kata would look: refused, and it keeps its socket.
    fs::create_dir_all(&kata_dir).unwrap();
    let other = UnixListener::bind(kata_dir.join("vhu.sock")).unwrap();
    let r = w.run_in("ADD", "own2", "eth0", &conf_in("ipam2"), &netns);
    r.fails_with(104);
    assert!(
        kata_dir.join("vhu.sock").exists(),
        "another backend's socket was removed"
    );
    drop(other);
    fs::remove_dir_all(&kata_dir).unwrap();

    // 3. A squatter's symlink in /tmp is replaced, never followed.
    let target = w.dir.path().join("squatted");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("keep"), b"x").unwrap();
    std::os::unix::fs::symlink(&target, &kata_dir).unwrap();
    let conf = conf_in("ipam3");
    let r = w.run_in("ADD", "own3", "eth0", &conf, &netns).ok().unwrap();
    let socket = guest_iface(&r)["socketPath"].as_str().unwrap().to_string();
    assert_eq!(socket, kata_dir.join("vhu.sock").to_string_lossy());
    let md = fs::symlink_metadata(&kata_dir).unwrap();
    assert!(md.is_dir() && !md.file_type().is_symlink());
    assert!(target.join("keep").exists(), "the symlink was followed");
    assert!(!target.join("vhu.sock").exists());
    assert_eq!(w.run_in("DEL", "own3", "eth0", &conf, &netns).ok(), None);
    w.assert_clean();
}

#[test]
fn node_daemon_switch_pods_talk_vm_to_vm() {
    // `hostPort.kind = "switch"`: two Kata runtime-go pods on the node daemon's userspace
    // switch ping each other without a kernel bridge, and reach the node through the switch's
    // uplink tap, which carries their gateway.
    let test = "node_daemon_switch_pods_talk_vm_to_vm";
    if !can_boot(test) {
        return;
    }
    let w = World::new("nsw", 13);
    let control = w.dir.path().join("node.sock");
    let mut daemon = Command::new("ip")
        .args(["netns", "exec", &w.ns, DAEMON, "--control"])
        .arg(&control)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the node daemon", Duration::from_secs(10), || {
        UnixStream::connect(&control).is_ok()
    });
    let conf = w.go_conf(json!({
        "daemon": {"control": control},
        "hostPort": {"kind": "switch", "switch": "pods", "uplinkTap": "vpnsw-up"},
    }));
    let mut pods = Vec::new();
    for name in ["sw-a", "sw-b"] {
        let ns = w.pod_netns(&format!("nsw-{name}"));
        let netns = format!("/run/netns/{ns}");
        let r = w.run_in("ADD", name, "eth0", &conf, &netns).ok().unwrap();
        let eps = kata_go_scan(&w, &ns);
        assert_eq!(eps.len(), 1, "{eps:?}");
        pods.push((name, netns, r, eps.into_iter().next().unwrap()));
    }
    // The switch exists once, with its uplink; both pods' ports are on it.
    let switches = node_request(&control, &json!({"op": "list-switches"}));
    assert_eq!(
        switches["switches"].as_array().map(Vec::len),
        Some(1),
        "{switches}"
    );
    assert_eq!(switches["switches"][0]["name"], "pods", "{switches}");
    assert_eq!(
        switches["switches"][0]["uplinks"][0]["name"], "vpnsw-up",
        "{switches}"
    );
    let up = w.link("vpnsw-up");
    assert!(up.to_string().contains("\"UP\""), "uplink tap not up: {up}");
    assert!(
        w.ip(&["-o", "addr", "show", "dev", "vpnsw-up"])
            .contains(&w.gateway()),
        "the gateway address is not on the uplink tap"
    );
    let mut vms: Vec<QemuGuest> = pods
        .iter()
        .map(|(name, _, _, ep)| kata_go_guest(ep, &format!("nsw-{name}")))
        .collect();
    let b_ip = pods[1].3.address.split('/').next().unwrap().to_string();
    let rtt = guest_pings(&mut vms[0], &b_ip);
    eprintln!("FIGURE switch pods (runtime-go + QEMU): pod to pod ping {rtt:.3} ms (TCG guests)");
    let rtt = guest_pings(&mut vms[1], &w.gateway());
    eprintln!("FIGURE switch pods: pod to node (uplink) ping {rtt:.3} ms");
    // Both pods' MACs were learned on their own ports; frames went port to port.
    let fdb = node_request(&control, &json!({"op": "fdb", "name": "pods"}));
    for (_, _, _, ep) in &pods {
        assert!(
            fdb["fdb"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["mac"].as_str() == Some(ep.mac.as_str())
                    && e["member"] != "uplink:vpnsw-up"),
            "{} not learned on its port: {fdb}",
            ep.mac
        );
    }
    let stats = node_request(&control, &json!({"op": "stats"}));
    let forwarded: u64 = stats["stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["switch"]["forwarded"].as_u64().unwrap_or(0))
        .sum();
    assert!(forwarded > 0, "no frame forwarded port to port: {stats}");
    for (name, netns, r, _) in &pods {
        let mut check = conf.clone();
        check["prevResult"] = r.clone();
        assert_eq!(w.run_in("CHECK", name, "eth0", &check, netns).ok(), None);
    }
    drop(vms);
    for (name, netns, _, _) in &pods {
        assert_eq!(w.run_in("DEL", name, "eth0", &conf, netns).ok(), None);
    }
    let left = node_request(&control, &json!({"op": "list"}));
    assert_eq!(left["ports"].as_array().map(Vec::len), Some(0), "{left}");
    let _ = daemon.kill();
    let _ = daemon.wait();
    w.assert_clean();
}
