//! The `vhost-pump-cni` plugin, run exactly as a container runtime runs it: `CNI_*` variables,
//! the network configuration on stdin, the result or error JSON on stdout. Every test works in
//! a named network namespace of its own (`ip netns exec` also gives the plugin a private mount
//! namespace) with its own socket, DAN and IPAM directories, and Debian's real `host-local`
//! from /usr/lib/cni as the IPAM plugin.
//!
//! Covered: ADD/CHECK/DEL/DEL, sidecar restart, GC, STATUS, VERSION, answers in 0.4.0, 1.0.0
//! and 1.1.0, client mode, AF_PACKET on a macvlan, 21 concurrent ADDs (two interfaces in one
//! sandbox), bad inputs and a failed ADD leaving nothing behind, the DAN file read with a
//! strict mirror of Kata runtime-rs's schema, an end-to-end QEMU guest started from the ADD
//! result. Needs root (skipped otherwise, failed under `CI=true`).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use common::guest::{self, GuestOpts, QemuGuest};

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

/// One test's world: a named netns and temporary socket, DAN and IPAM directories.
struct World {
    ns: String,
    dir: tempfile::TempDir,
    subnet: u8,
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
        let w = World { ns, dir, subnet };
        w.ip(&["link", "set", "lo", "up"]);
        w
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
        let out = Command::new("ip")
            .args(["-n", &self.ns])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
        cmd.args(["netns", "exec", &self.ns, PLUGIN])
            .env_clear()
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

    /// Runs `command` for container `cid`, interface `ifname`, with `conf`.
    fn run(&self, command: &str, cid: &str, ifname: &str, conf: &Value) -> Reply {
        let netns = format!("/var/run/netns/pod-{cid}");
        self.run_raw(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", cid),
                ("CNI_IFNAME", ifname),
                ("CNI_NETNS", &netns),
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

    // The DAN file, as Kata reads it.
    let dan = w.dan(cid);
    assert_eq!(
        dan.netns.as_deref(),
        Some(format!("/run/netns/{}", w.ns).as_str())
    );
    assert_eq!(dan.devices.len(), 1);
    let d = &dan.devices[0];
    assert_eq!(
        (d.name.as_str(), d.guest_mac.as_str()),
        ("eth0", mac.as_str())
    );
    match &d.device {
        KataDevice::VhostUser {
            path,
            queue_num,
            queue_size,
        } => {
            assert_eq!(Path::new(path), socket);
            assert_eq!((*queue_num, *queue_size), (1, 256));
        }
        other => panic!("not a vhost-user device: {other:?}"),
    }
    assert_eq!(d.network_info.interface.ip_addresses, [address.as_str()]);
    assert_eq!(d.network_info.interface.mtu, 1500);
    assert!(d.network_info.neighbors.is_empty());
    let r = &d.network_info.routes[0];
    assert_eq!(
        (r.dest.as_str(), r.gateway.as_str()),
        ("0.0.0.0/0", w.gateway().as_str())
    );
    assert_eq!((r.source.as_str(), r.scope), ("", 0));

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
        // The DAN file always carries the socket.
        assert!(matches!(
            w.dan(&cid).devices[0].device,
            KataDevice::VhostUser { .. }
        ));
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

    let status = |c: &Value| {
        w.run_raw(
            &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", CNI_PATH)],
            c.to_string().as_bytes(),
        )
    };
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
    let conf = w.conf(json!({}));
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
    for s in &sockets {
        UnixStream::connect(s).unwrap_or_else(|e| panic!("{s}: {e}"));
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
    let conf = w.conf(
        json!({"vhostUserMode": "client", "queues": 2, "socketMode": "0600",
                             "runtimeConfig": {"mac": "02:11:22:33:44:55"}}),
    );
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
        assert!(UnixStream::connect(guest_iface(&result)["socketPath"].as_str().unwrap()).is_ok());
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

#[test]
fn qemu_guest_from_the_add_result_pings_the_gateway() {
    if !can_run("qemu_guest_from_the_add_result_pings_the_gateway") {
        return;
    }
    if let Some(why) = guest::missing_prereqs() {
        guest::skip_or_fail("qemu_guest_from_the_add_result_pings_the_gateway", &why);
        return;
    }
    let w = World::new("vm", 8);
    let conf = w.conf(json!({}));
    let r = w.run("ADD", "vm-sandbox", "eth0", &conf).ok().unwrap();
    let g = guest_iface(&r);
    let dan = w.dan("vm-sandbox");
    let route = &dan.devices[0].network_info.routes[0];

    // Start the VM the way Kata would from the DAN entry: socket, MAC, address, gateway.
    let mut opts = GuestOpts::vhost_user(g["socketPath"].as_str().unwrap(), 1);
    opts.mac = dan.devices[0].guest_mac.clone();
    opts.ip = Some(dan.devices[0].network_info.interface.ip_addresses[0].clone());
    opts.gateway = Some(route.gateway.clone());
    opts.mtu = Some(dan.devices[0].network_info.interface.mtu as u32);
    opts.name = "cni-e2e".into();
    let mut vm = QemuGuest::start(&opts).expect("start QEMU");
    let boot = vm.wait_ready(Duration::from_secs(90)).expect("guest ready");
    eprintln!(
        "guest ready after {boot:.2?}; logs in {}",
        vm.log_dir().display()
    );
    let ping = vm
        .run(
            &format!("ping -c 3 -W 5 {}", w.gateway()),
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(ping.contains(" 0% packet loss"), "ping failed:\n{ping}");
    // The guest's default route works too (the gateway answers for the route's next hop).
    let mac = vm
        .run_ok("cat /sys/class/net/eth0/address", Duration::from_secs(10))
        .unwrap();
    assert_eq!(mac.trim(), g["mac"].as_str().unwrap());
    drop(vm);
    assert_eq!(w.run("DEL", "vm-sandbox", "eth0", &conf).ok(), None);
    w.assert_clean();
}
