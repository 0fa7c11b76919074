//! Memory hotplug: a running QEMU guest gets a DIMM added (`object_add` + `device_add` on the
//! monitor); with CONFIGURE_MEM_SLOTS QEMU hands the new region to the backend with
//! ADD_MEM_REG, the guest onlines it, and traffic keeps flowing, including buffers the guest
//! places in the new memory. Needs root and QEMU: skipped outside CI, failed under `CI=true`.

use std::time::{Duration, Instant};

use testkit::guest::{self, hmp, GuestOpts, QemuGuest};
use testkit::netns::{KillOnDrop, NamedNetns};

const TAP: &str = "vpmem0";
const HOST_IP: &str = "10.249.0.1";

#[test]
fn hot_added_memory_reaches_the_backend() {
    if let Some(why) = guest::missing_prereqs() {
        guest::skip_or_fail("hot_added_memory_reaches_the_backend", &why);
        return;
    }
    let dir = testkit::netns::target_workdir("memhp");
    let socket = dir.join("vu.sock");
    let log_path = dir.join("vhost-pump.log");
    let ns = NamedNetns::create("vp-memhp");
    ns.exec(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap"]);
    ns.exec(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
    let log = std::fs::File::create(&log_path).unwrap();
    let _daemon = KillOnDrop(
        ns.cmd(&[
            env!("CARGO_BIN_EXE_vhost-pump"),
            "--socket",
            socket.to_str().unwrap(),
        ])
        .args(["--tap", TAP])
        .stderr(log)
        .spawn()
        .unwrap(),
    );
    let t = Instant::now();
    while !socket.exists() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let _iperf = ns.spawn_quiet(&["iperf3", "-s"]);

    let monitor = dir.join("monitor.sock");
    let mut opts = GuestOpts::vhost_user(&socket, 1);
    opts.ip = Some("10.249.0.2/24".into());
    opts.memory_mib = 256;
    opts.max_memory_mib = Some(1024);
    opts.monitor_socket = Some(monitor.clone());
    opts.kernel_args.push("memhp_default_state=online".into());
    opts.name = "memhp".into();
    let mut vm = QemuGuest::start(&opts).expect("start QEMU");
    vm.wait_ready(Duration::from_secs(90)).expect("guest ready");
    let t60 = Duration::from_secs(60);
    let ping = vm.run(&format!("ping -c 2 -W 5 {HOST_IP}"), t60).unwrap();
    assert!(ping.contains(" 0% packet loss"), "{ping}");
    let total = |vm: &mut QemuGuest| -> u64 {
        let m = vm.run_ok("grep MemTotal /proc/meminfo", t60).unwrap();
        m.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before = total(&mut vm);

    // Hot-add 512 MiB of shared memory (the backend must be able to map it too).
    let r = hmp(
        &monitor,
        "object_add memory-backend-memfd,id=hp0,size=512M,share=on",
    )
    .unwrap();
    assert!(!r.contains("rror"), "object_add: {r}");
    let r = hmp(&monitor, "device_add pc-dimm,id=dimm0,memdev=hp0,node=0").unwrap();
    assert!(!r.contains("rror"), "device_add: {r}");
    let t = Instant::now();
    let mut after = before;
    while after < before + 400 * 1024 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
        after = total(&mut vm);
    }
    assert!(
        after >= before + 400 * 1024,
        "guest memory {before} kB -> {after} kB"
    );
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // One region at boot, one more for the DIMM (placed above 4 GiB).
    assert!(
        log_text().matches("guest memory region added").count() >= 2
            && log_text().contains("gpa=\"0x100000000\""),
        "the backend never heard of the new region:\n{}",
        log_text()
    );

    // Make the guest use the new memory: fill most of the old memory's free space with a
    // tmpfs file, so new socket buffers come from the hot-added DIMM, then move traffic.
    vm.run_ok("mkdir -p /fill && mount -t tmpfs -o size=90% tmpfs /fill && dd if=/dev/zero of=/fill/x bs=1M count=150 2>/dev/null; true", t60)
        .unwrap();
    let up = vm
        .run_ok(&format!("iperf3 -c {HOST_IP} -t 2 -f m"), t60)
        .unwrap();
    let down = vm
        .run_ok(&format!("iperf3 -c {HOST_IP} -t 2 -f m -R"), t60)
        .unwrap();
    for out in [&up, &down] {
        assert!(out.contains("receiver"), "{out}");
    }
    let ping = vm.run(&format!("ping -c 3 -W 5 {HOST_IP}"), t60).unwrap();
    assert!(ping.contains(" 0% packet loss"), "{ping}\n{}", log_text());
}
