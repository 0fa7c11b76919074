//! Smoke test of the VM test harness (`tests/common/guest.rs`, `tests/setup/build-guest.sh`):
//! boots the guest on QEMU's own tap path and checks that its network and tools work.
//!
//! Needs root and QEMU; skipped otherwise, except under `CI=true` where it fails.
//! Run: `cargo test --test guest_smoke -- --nocapture`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::guest::{self, GuestOpts, QemuGuest};

const TAP: &str = "vpsmoke0";
const HOST_IP: &str = "10.250.0.1";
const GUEST_CIDR: &str = "10.250.0.2/24";

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A host tap with an address, deleted on drop (also when the test panics).
struct HostTap(&'static str);

impl HostTap {
    fn create(name: &'static str, cidr: &str) -> HostTap {
        // A tap left over by an interrupted run would make `tuntap add` fail.
        let _ = Command::new("ip").args(["link", "del", name]).output();
        ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        let tap = HostTap(name);
        ip(&["addr", "add", cidr, "dev", name]);
        ip(&["link", "set", name, "up"]);
        tap
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", self.0]).output();
    }
}

#[test]
fn guest_boots_on_tap_and_pings_host() {
    if let Some(why) = guest::missing_prereqs() {
        guest::skip_or_fail("guest_boots_on_tap_and_pings_host", &why);
        return;
    }

    let t = Instant::now();
    let dir = guest::guest_dir();
    eprintln!(
        "guest image: {} (ready in {:.2?})",
        dir.display(),
        t.elapsed()
    );

    let tap = HostTap::create(TAP, &format!("{HOST_IP}/24"));
    let mut opts = GuestOpts::tap(TAP);
    opts.ip = Some(GUEST_CIDR.into());
    opts.name = "smoke".into();
    let mut vm = QemuGuest::start(&opts).expect("start QEMU");
    eprintln!("qemu: {}", vm.command_line());

    let boot = vm.wait_ready(Duration::from_secs(60)).expect("guest ready");
    eprintln!(
        "guest ready {boot:.2?} after QEMU started (logs: {})",
        vm.log_dir().display()
    );

    let ping = vm
        .run(
            &format!("ping -c 3 -W 2 {HOST_IP}"),
            Duration::from_secs(30),
        )
        .unwrap();
    eprintln!("{ping}");
    assert!(ping.success(), "ping failed: {ping}");
    assert!(
        ping.contains(" 0% packet loss"),
        "ping lost packets: {ping}"
    );

    let features = vm
        .run_ok("ethtool -k eth0", Duration::from_secs(20))
        .unwrap();
    assert!(
        features
            .lines()
            .any(|l| l.trim_start().starts_with("tcp-segmentation-offload:")),
        "no tcp-segmentation-offload line in ethtool -k:\n{features}"
    );

    // Exit statuses and multi-line commands come back intact.
    let out = vm
        .run("cd /proc\necho in $(pwd); false", Duration::from_secs(20))
        .unwrap();
    assert_eq!((out.output.as_str(), out.status), ("in /proc\n", 1));
    assert_eq!(
        vm.run_ok("pwd", Duration::from_secs(20)).unwrap(),
        "/proc\n"
    );

    drop(vm);
    drop(tap);
    assert!(
        !Path::new(&format!("/sys/class/net/{TAP}")).exists(),
        "tap not removed"
    );
}

/// Needs no root: the QEMU command line built for a multiqueue vhost-user guest.
#[test]
fn vhost_user_command_line() {
    assert_eq!(
        guest::parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)\n"),
        Some((7, 2))
    );
    assert_eq!(
        guest::parse_qemu_version("QEMU emulator version 10.0.2\n"),
        Some((10, 0))
    );
    let Ok((major, _)) = guest::qemu_version() else {
        guest::skip_or_fail("vhost_user_command_line", "QEMU not installed");
        return;
    };
    let mut opts = GuestOpts::vhost_user("/run/vp.sock", 2);
    opts.ip = Some("10.0.0.2/24".into());
    opts.mtu = Some(9000);
    if let guest::NetKind::VhostUser { reconnect, .. } = &mut opts.net {
        *reconnect = true;
    }
    let args = opts.qemu_args(Path::new("/guest")).unwrap().join(" ");
    for want in [
        "-object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem",
        "-chardev socket,id=c0,path=/run/vp.sock,reconnect",
        "-netdev vhost-user,id=n0,chardev=c0,queues=2",
        "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,mq=on,vectors=",
        "vp.ip=10.0.0.2/24 vp.mtu=9000 vp.queues=2",
        "-kernel /guest/vmlinuz -initrd /guest/initramfs.cpio.gz",
    ] {
        assert!(args.contains(want), "{want:?} missing from {args}");
    }
    let vectors = if major < 8 { "vectors=0" } else { "vectors=6" };
    assert!(args.contains(vectors), "{vectors} missing from {args}");
}
