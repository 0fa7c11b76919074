//! The files under `deploy/` fit together: every conflist is a configuration the plugin accepts
//! for the Kata path it names, the Kata snippets agree with the conflists, the containerd
//! drop-ins define the runtime handlers the RuntimeClasses name and point each at the directory
//! the DaemonSet fills with that runtime's conflist, the node daemon's command line is one
//! vhost-pump accepts and has the host paths it needs, and the systemd unit runs a valid
//! command line. Pure file checks: no root needed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use vhost_pump::cni::config::{NetConf, VhostUserMode};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &str) -> String {
    fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

/// The containerd runtime handler (and RuntimeClass) of each `"kata"` value, with the shim
/// and Kata configuration kata-deploy installs for it.
struct Handler {
    kata: &'static str,
    name: &'static str,
    shim: &'static str,
    config: &'static str,
}

const HANDLERS: [Handler; 2] = [
    Handler {
        kata: "go",
        name: "kata-qemu",
        shim: "/opt/kata/bin/containerd-shim-kata-v2",
        config: "/opt/kata/share/defaults/kata-containers/runtimes/qemu/configuration-qemu.toml",
    },
    Handler {
        kata: "rs",
        name: "kata-dragonball",
        shim: "/opt/kata/runtime-rs/bin/containerd-shim-kata-v2",
        config: "/opt/kata/share/defaults/kata-containers/runtime-rs/runtimes/dragonball/configuration-dragonball.toml",
    },
];

fn handler_for(kata: &str) -> &'static Handler {
    HANDLERS
        .iter()
        .find(|h| h.kata == kata)
        .unwrap_or_else(|| panic!("no runtime handler for \"kata\": {kata:?}"))
}

/// Validates the `vhost-pump-cni` entry of a conflist the way a runtime hands it over (name
/// and cniVersion injected from the list).
fn plugin_conf(what: &str, list: &Value) -> (NetConf, Value) {
    assert!(list["name"].is_string(), "{what}: name");
    assert_eq!(
        list["cniVersion"], "1.0.0",
        "{what}: containerd 1.6/1.7 know no CNI version above 1.0.0"
    );
    let plugins = list["plugins"].as_array().expect("plugins");
    let ours: Vec<&Value> = plugins
        .iter()
        .filter(|p| p["type"] == "vhost-pump-cni")
        .collect();
    assert_eq!(ours.len(), 1, "{what}: one vhost-pump-cni plugin");
    let mut c = ours[0].clone();
    c["name"] = list["name"].clone();
    c["cniVersion"] = list["cniVersion"].clone();
    let conf = NetConf::from_value(c.clone()).unwrap_or_else(|e| panic!("{what}: {e:?}"));
    (conf, c)
}

fn conflists() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(deploy("cni")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "conflist") {
            continue;
        }
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        let list: Value = serde_json::from_str(&fs::read_to_string(&p).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        out.insert(name, list);
    }
    out
}

fn kata_dan_conf() -> PathBuf {
    let kata: toml::Value =
        toml::from_str(&read("kata/configuration-dan.toml")).expect("Kata snippet is TOML");
    PathBuf::from(
        kata["runtime"]["dan_conf"]
            .as_str()
            .expect("[runtime] dan_conf"),
    )
}

#[test]
fn deploy_conflists_are_valid_plugin_configs() {
    let lists = conflists();
    let dan_conf = kata_dan_conf();
    let mut covered = BTreeSet::new();
    for (name, list) in &lists {
        assert!(
            name.len() > 3 && name.as_bytes()[..2].iter().all(u8::is_ascii_digit),
            "{name}: NN- prefix, so the files sort as the README lists them"
        );
        let (conf, raw) = plugin_conf(name, list);
        let kata = conf.kata.as_str();
        assert_eq!(
            raw.get("kata").and_then(Value::as_str),
            Some(kata),
            "{name}: says which Kata path it is for"
        );
        match kata {
            "go" => {
                assert_eq!(conf.queues, 1, "{name}: Kata's QEMU has one queue pair");
                assert_eq!(conf.mode, VhostUserMode::Server, "{name}: QEMU connects");
                assert!(
                    raw.get("danConfDir").is_none(),
                    "{name}: runtime-go reads no DAN file"
                );
            }
            "rs" => {
                assert_eq!(
                    conf.mode,
                    VhostUserMode::Client,
                    "{name}: Dragonball listens"
                );
                assert_eq!(
                    conf.dan_conf_dir, dan_conf,
                    "{name}: danConfDir must equal the Kata snippet's dan_conf"
                );
            }
            other => panic!("{name}: \"kata\": {other:?} has no Kubernetes deployment here"),
        }
        handler_for(kata);
        assert!(conf.ipam.is_some(), "{name}: addresses come from IPAM");
        covered.insert((kata, conf.daemon.is_some()));
    }
    for want in [("go", false), ("rs", false), ("go", true), ("rs", true)] {
        assert!(
            covered.contains(&want),
            "no conflist for kata {:?} in {} mode; have {covered:?}",
            want.0,
            if want.1 { "node-daemon" } else { "sidecar" }
        );
    }
}

/// Every YAML document of a file under `deploy/kubernetes/`.
fn manifests(file: &str) -> Vec<serde_yaml_ng::Value> {
    serde_yaml_ng::Deserializer::from_str(&read(&format!("kubernetes/{file}")))
        .map(|de| serde_yaml_ng::Value::deserialize(de).expect("valid YAML"))
        .filter(|d| !d.is_null())
        .collect()
}

fn all_manifests() -> Vec<serde_yaml_ng::Value> {
    let mut docs = manifests("vhost-pump-cni.yaml");
    docs.extend(manifests("runtimeclasses.yaml"));
    docs
}

fn of_kind<'a>(docs: &'a [serde_yaml_ng::Value], kind: &str) -> Vec<&'a serde_yaml_ng::Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// Checks `doc[path...]` is present and returns it.
#[track_caller]
fn field<'a>(doc: &'a serde_yaml_ng::Value, path: &[&str]) -> &'a serde_yaml_ng::Value {
    let mut v = doc;
    for p in path {
        v = v
            .get(*p)
            .unwrap_or_else(|| panic!("missing {} in {:?}", path.join("."), doc.get("kind")));
    }
    v
}

#[track_caller]
fn seq(v: &serde_yaml_ng::Value) -> &[serde_yaml_ng::Value] {
    v.as_sequence().expect("a list")
}

#[track_caller]
fn text(v: &serde_yaml_ng::Value) -> &str {
    v.as_str().expect("a string")
}

/// The DaemonSet's pod spec, its hostPath volumes by name, and its containers by name.
struct DaemonPod<'a> {
    pod: &'a serde_yaml_ng::Value,
    host_paths: BTreeMap<String, String>,
    containers: BTreeMap<String, &'a serde_yaml_ng::Value>,
}

fn daemon_pod(docs: &[serde_yaml_ng::Value]) -> DaemonPod<'_> {
    let ds = of_kind(docs, "DaemonSet");
    assert_eq!(ds.len(), 1, "one DaemonSet");
    let pod = field(ds[0], &["spec", "template", "spec"]);
    let host_paths = seq(field(pod, &["volumes"]))
        .iter()
        .filter_map(|v| {
            v.get("hostPath").map(|h| {
                (
                    text(field(v, &["name"])).into(),
                    text(field(h, &["path"])).into(),
                )
            })
        })
        .collect();
    let containers = seq(field(pod, &["initContainers"]))
        .iter()
        .chain(seq(field(pod, &["containers"])))
        .map(|c| (text(field(c, &["name"])).to_string(), c))
        .collect();
    DaemonPod {
        pod,
        host_paths,
        containers,
    }
}

/// Where on the host a container's `mount_path` lands, through a hostPath volume.
fn host_path_of(d: &DaemonPod<'_>, container: &str, mount_path: &str) -> Option<String> {
    let c = d.containers[container];
    seq(field(c, &["volumeMounts"])).iter().find_map(|m| {
        let mp = text(field(m, &["mountPath"]));
        let rest = mount_path.strip_prefix(mp)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        let hp = d.host_paths.get(text(field(m, &["name"])))?;
        Some(format!("{hp}{rest}"))
    })
}

#[test]
fn deploy_kubernetes_manifests_are_well_formed() {
    let docs = all_manifests();
    let mut kinds = BTreeSet::new();
    for doc in &docs {
        let kind = text(field(doc, &["kind"])).to_string();
        assert!(field(doc, &["apiVersion"]).is_string());
        assert!(field(doc, &["metadata", "name"]).is_string());
        match kind.as_str() {
            "DaemonSet" => {
                assert_eq!(field(doc, &["apiVersion"]).as_str(), Some("apps/v1"));
                let sel = field(doc, &["spec", "selector", "matchLabels"]);
                let labels = field(doc, &["spec", "template", "metadata", "labels"]);
                for (k, v) in sel.as_mapping().unwrap() {
                    assert_eq!(labels.get(k), Some(v), "selector must match the pod labels");
                }
                let pod = field(doc, &["spec", "template", "spec"]);
                let volumes: BTreeSet<String> = seq(field(pod, &["volumes"]))
                    .iter()
                    .map(|v| {
                        match v.get("hostPath") {
                            Some(h) => assert!(text(field(h, &["path"])).starts_with('/')),
                            None => assert!(field(v, &["configMap", "name"]).is_string()),
                        }
                        text(field(v, &["name"])).to_string()
                    })
                    .collect();
                let mut mounted = BTreeSet::new();
                for c in seq(field(pod, &["initContainers"]))
                    .iter()
                    .chain(seq(field(pod, &["containers"])))
                {
                    assert!(field(c, &["name"]).is_string());
                    assert!(!text(field(c, &["image"])).is_empty());
                    assert!(!seq(field(c, &["command"])).is_empty());
                    for m in c
                        .get("volumeMounts")
                        .and_then(|m| m.as_sequence())
                        .into_iter()
                        .flatten()
                    {
                        let n = text(field(m, &["name"])).to_string();
                        assert!(volumes.contains(&n), "volumeMount {n} has no volume");
                        assert!(text(field(m, &["mountPath"])).starts_with('/'));
                        mounted.insert(n);
                    }
                }
                assert_eq!(mounted, volumes, "every volume is mounted");
            }
            "RuntimeClass" => {
                assert_eq!(field(doc, &["apiVersion"]).as_str(), Some("node.k8s.io/v1"));
                assert!(field(doc, &["handler"]).is_string());
            }
            "ConfigMap" => {
                for (k, v) in field(doc, &["data"]).as_mapping().unwrap() {
                    if text(k).ends_with(".conflist") {
                        serde_json::from_str::<Value>(text(v))
                            .expect("the conflist in the ConfigMap is JSON");
                    }
                }
            }
            _ => {}
        }
        kinds.insert(kind);
    }
    for want in ["DaemonSet", "RuntimeClass", "ConfigMap", "Namespace"] {
        assert!(kinds.contains(want), "{want} missing; have {kinds:?}");
    }
}

/// The conflists the DaemonSet installs: host directory → (ConfigMap key, conflist).
fn installed_conflists(docs: &[serde_yaml_ng::Value]) -> BTreeMap<String, (String, Value)> {
    let cms = of_kind(docs, "ConfigMap");
    assert_eq!(cms.len(), 1, "one ConfigMap");
    let data = field(cms[0], &["data"]);
    let d = daemon_pod(docs);
    let config_volume = seq(field(d.pod, &["volumes"]))
        .iter()
        .find(|v| v.get("configMap").is_some())
        .expect("the ConfigMap volume");
    assert_eq!(
        field(config_volume, &["configMap", "name"]),
        field(cms[0], &["metadata", "name"])
    );
    let mut out = BTreeMap::new();
    // The install step copies /config/<dir>/<file> to /host/etc/cni/<dir>/<file>.
    for item in seq(field(config_volume, &["configMap", "items"])) {
        let key = text(field(item, &["key"]));
        let (dir, file) = text(field(item, &["path"]))
            .split_once('/')
            .expect("items[].path is <runtime CNI dir>/<file>");
        assert_eq!(file, key, "installed under its own name");
        let host_dir = host_path_of(&d, "install", &format!("/host/etc/cni/{dir}"))
            .expect("the install container mounts the host's /etc/cni");
        let list: Value = serde_json::from_str(text(field(data, &[key]))).unwrap();
        assert!(
            out.insert(host_dir.clone(), (key.to_string(), list))
                .is_none(),
            "two conflists for {host_dir}: containerd would load only the first"
        );
    }
    assert!(!out.is_empty());
    out
}

#[test]
fn daemonset_installs_each_runtime_its_own_conflist() {
    let docs = all_manifests();
    let files = conflists();
    let mut runtimes = BTreeSet::new();
    for (host_dir, (key, list)) in installed_conflists(&docs) {
        assert_eq!(
            files.get(&key),
            Some(&list),
            "the ConfigMap's {key} differs from deploy/cni/{key}"
        );
        assert_ne!(
            host_dir, "/etc/cni/net.d",
            "never the node's default CNI directory: it would replace every pod's network"
        );
        let (conf, _) = plugin_conf(&key, &list);
        assert!(
            conf.daemon.is_some(),
            "{key}: the DaemonSet runs the node daemon, so its conflists use it"
        );
        assert!(runtimes.insert(handler_for(conf.kata.as_str()).name));
    }
    assert_eq!(
        runtimes.len(),
        HANDLERS.len(),
        "a conflist for each handler"
    );
}

/// containerd drop-ins: file, config version, runtimes table.
const CONTAINERD: [(&str, i64, &[&str]); 2] = [
    (
        "containerd/containerd-1.x-kata-vhost-pump.toml",
        2,
        &[
            "plugins",
            "io.containerd.grpc.v1.cri",
            "containerd",
            "runtimes",
        ],
    ),
    (
        "containerd/containerd-2.x-kata-vhost-pump.toml",
        3,
        &[
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
        ],
    ),
];

#[test]
fn containerd_dropins_define_the_handlers_with_their_cni_dirs() {
    let docs = all_manifests();
    // Runtime handler → the host directory the DaemonSet fills with its conflist.
    let cni_dirs: BTreeMap<&str, String> = installed_conflists(&docs)
        .into_iter()
        .map(|(dir, (key, list))| {
            (
                handler_for(plugin_conf(&key, &list).0.kata.as_str()).name,
                dir,
            )
        })
        .collect();
    let classes: BTreeSet<String> = of_kind(&docs, "RuntimeClass")
        .iter()
        .map(|rc| text(field(rc, &["handler"])).to_string())
        .collect();
    let want: BTreeSet<String> = HANDLERS.iter().map(|h| h.name.to_string()).collect();
    assert_eq!(classes, want, "RuntimeClass handlers");

    for (file, version, table) in CONTAINERD {
        let doc: toml::Value =
            toml::from_str(&read(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            doc["version"].as_integer(),
            Some(version),
            "{file}: version"
        );
        let mut runtimes = &doc;
        for t in table {
            runtimes = runtimes
                .get(*t)
                .unwrap_or_else(|| panic!("{file}: no [{}]", table.join(".")));
        }
        let names: BTreeSet<String> = runtimes.as_table().unwrap().keys().cloned().collect();
        assert_eq!(
            names, classes,
            "{file}: the runtimes the RuntimeClasses name"
        );
        for h in &HANDLERS {
            let rt = &runtimes[h.name];
            let s = |k: &str| rt.get(k).and_then(toml::Value::as_str);
            assert_eq!(
                s("runtime_type"),
                Some(format!("io.containerd.{}.v2", h.name).as_str()),
                "{file}: {}",
                h.name
            );
            assert_eq!(s("runtime_path"), Some(h.shim), "{file}: {}", h.name);
            assert_eq!(
                rt.get("options")
                    .and_then(|o| o.get("ConfigPath"))
                    .and_then(toml::Value::as_str),
                Some(h.config),
                "{file}: {}",
                h.name
            );
            assert_eq!(
                rt.get("privileged_without_host_devices")
                    .and_then(toml::Value::as_bool),
                Some(true),
                "{file}: {}",
                h.name
            );
            assert!(
                rt.get("pod_annotations")
                    .and_then(toml::Value::as_array)
                    .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("io.katacontainers.*"))),
                "{file}: {}: pod_annotations",
                h.name
            );
            assert_eq!(
                s("cni_conf_dir"),
                Some(cni_dirs[h.name].as_str()),
                "{file}: {}: cni_conf_dir must be where the DaemonSet installs its conflist",
                h.name
            );
            assert_eq!(
                rt.get("cni_max_conf_num").and_then(toml::Value::as_integer),
                Some(1),
                "{file}: {}",
                h.name
            );
        }
    }
}

#[test]
fn kata_snippets_match_the_conflists() {
    let dan = kata_dan_conf();
    assert_eq!(
        dan,
        Path::new("/run/kata-containers/dans"),
        "Kata's default"
    );
    let go: toml::Value = toml::from_str(&read("kata/configuration-qemu-vhost-user.toml"))
        .expect("runtime-go snippet is TOML");
    assert_eq!(
        go["hypervisor"]["qemu"]["shared_fs"].as_str(),
        Some("virtio-fs"),
        "vhost-user needs the shared guest memory virtio-fs brings"
    );
    assert!(
        go.get("runtime").and_then(|r| r.get("dan_conf")).is_none(),
        "runtime-go reads no DAN file"
    );
}

#[test]
fn node_daemon_runs_a_valid_command_line_with_the_host_paths_it_needs() {
    use clap::Parser;
    let docs = all_manifests();
    let d = daemon_pod(&docs);
    assert_eq!(field(d.pod, &["hostNetwork"]).as_bool(), Some(true));
    let c = d.containers["node-daemon"];
    let argv: Vec<String> = seq(field(c, &["command"]))
        .iter()
        .chain(c.get("args").map(seq).into_iter().flatten())
        .map(|a| text(a).to_string())
        .collect();
    assert!(argv[0].ends_with("/vhost-pump"), "{argv:?}");
    let args = vhost_pump::cli::Args::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("vhost-pump refuses {argv:?}: {e}"));
    let control = args.control.expect("--control");
    let metrics = args.metrics.expect("--metrics");
    assert!(
        args.port.socket.is_none() && args.config.is_none(),
        "ports come from the plugin"
    );
    // A restarted daemon must serve the node's pods again: their ports are remembered on the
    // host (a mounted path, so the file outlives the container).
    let state = args.state_file.expect("--state-file");
    assert!(
        state.starts_with("/run/vhost-pump"),
        "--state-file {} is not on the host's /run/vhost-pump",
        state.display()
    );

    // Every conflist in node-daemon mode talks to this control socket.
    for (name, list) in conflists() {
        if let Some(dc) = plugin_conf(&name, &list).0.daemon {
            assert_eq!(dc.control, control, "{name}: daemon.control");
        }
    }

    // Prometheus finds the metrics endpoint.
    let port = metrics.rsplit_once(':').expect("HOST:PORT").1;
    let ann = field(
        &of_kind(&docs, "DaemonSet")[0]["spec"]["template"],
        &["metadata", "annotations"],
    );
    assert_eq!(ann["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(ann["prometheus.io/port"].as_str(), Some(port));
    assert_eq!(ann["prometheus.io/path"].as_str(), Some("/metrics"));

    assert_eq!(
        c["securityContext"]["privileged"].as_bool(),
        Some(true),
        "taps, macvlans and AF_PACKET on the host"
    );
    // Socket paths pass between the plugin, Kata and the daemon as strings, so these are
    // mounted at their host paths.
    for path in [
        control.parent().unwrap().to_str().unwrap(),
        "/run/vhost-pump",
        "/tmp",
        "/dev/net/tun",
    ] {
        assert_eq!(
            host_path_of(&d, "node-daemon", path).as_deref(),
            Some(path),
            "the node daemon needs the host's {path} at the same path"
        );
    }
}

#[test]
fn image_builds_static_binaries() {
    let docker = read("kubernetes/Dockerfile");
    assert!(
        docker.contains("deploy/build-static.sh"),
        "the Dockerfile builds with deploy/build-static.sh"
    );
    let script = read("build-static.sh");
    for want in [
        "target-feature=+crt-static",
        "--locked",
        "--bin vhost-pump",
        "--bin vhost-pump-cni",
        "NEEDED",
        "GLIBC_",
    ] {
        assert!(script.contains(want), "build-static.sh lacks {want}");
    }
}

/// The command line of `unit`'s `ExecStart=`, with the example env file's variables expanded
/// as systemd does (`$VAR` splits into words, `${VAR}` stays one word) and `%i` as `example`.
fn unit_argv(unit: &str) -> Vec<String> {
    let env_text = read("systemd/vhost-pump-example.env");
    let vars: Vec<(String, String)> = env_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=VALUE");
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut argv: Vec<String> = Vec::new();
    for word in exec.split_whitespace() {
        if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            let v = vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
            argv.push(v.unwrap_or_else(|| panic!("{name} not in the example env file")));
        } else if let Some(name) = word.strip_prefix('$') {
            let v = vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
            argv.extend(v.unwrap_or_default().split_whitespace().map(String::from));
        } else {
            argv.push(word.replace("%i", "example"));
        }
    }
    argv
}

#[test]
fn deploy_systemd_units_run_valid_command_lines() {
    use clap::Parser;
    for name in [
        "systemd/vhost-pump@.service",
        "systemd/vhost-pump-activated@.service",
    ] {
        let unit = read(name);
        for section in ["[Unit]", "[Service]"] {
            assert!(unit.contains(section), "{name}: {section} missing");
        }
        assert!(unit.contains("EnvironmentFile="), "{name}");
        let argv = unit_argv(&unit);
        assert!(argv[0].ends_with("/vhost-pump"), "{name}: {argv:?}");
        let args = vhost_pump::cli::Args::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{name}: vhost-pump refuses {argv:?}: {e}"));
        if name.contains("activated") {
            // systemd passes the first (only) socket of the unit as descriptor 3.
            assert_eq!(args.port.fd, Some(3), "{name}");
        } else {
            assert!(args.port.socket.is_some(), "{name}");
        }
    }
    let socket = read("systemd/vhost-pump-activated@.socket");
    assert!(socket.contains("[Socket]") && socket.contains("[Install]"));
    let listen = socket
        .lines()
        .find_map(|l| l.strip_prefix("ListenStream="))
        .expect("ListenStream");
    assert!(listen.starts_with('/'), "a Unix socket path: {listen}");
    // One service for every connection: vhost-pump accepts them itself.
    assert!(socket.contains("Accept=no"));
    let service = read("systemd/vhost-pump-activated@.service");
    assert!(service.contains("Requires=vhost-pump-activated@%i.socket"));
}

#[test]
fn qemu_backend_descriptor_matches_the_binary() {
    let text = read("qemu/50-vhost-pump.json");
    let d: serde_json::Value = serde_json::from_str(&text).expect("descriptor is JSON");
    assert_eq!(d["type"], "net");
    assert!(d["description"].as_str().is_some_and(|s| !s.is_empty()));
    // The same install path as the systemd units.
    let binary = d["binary"].as_str().expect("binary");
    let unit_binary = unit_argv(&read("systemd/vhost-pump@.service"))[0].clone();
    assert_eq!(binary, unit_binary);
    // What the binary says of itself agrees with the descriptor.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-pump"))
        .arg("--print-capabilities")
        .output()
        .unwrap();
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caps["type"], d["type"]);
}
