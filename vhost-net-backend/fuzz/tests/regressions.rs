//! Replays every input under `regressions/<target>/` (minimized fuzz findings and hand-made
//! hostile inputs) through the same harnesses the fuzz targets run, without sanitizers:
//! `cargo test --manifest-path vhost-net-backend/fuzz/Cargo.toml`.

use std::path::Path;

use vhost_net_backend_fuzz::chains::{self, F_HOLE, F_MRG_RXBUF, F_VERSION_1, TX_AVAIL, TX_DESC};
use vhost_net_backend_fuzz::relay;

fn replay(target: &str, run: impl Fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target);
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|x| x != "md"))
        .collect();
    entries.sort();
    for path in entries {
        let data = std::fs::read(&path).unwrap();
        eprintln!("replaying {}", path.display());
        run(&data);
        n += 1;
    }
    n
}

#[test]
fn descriptor_chain_regressions() {
    replay("descriptor_chains", |d| {
        chains::run(d);
    });
}

#[test]
fn relay_regressions() {
    replay("relay_messages", relay::run);
}

/// Former hangs (see `chains::spins_on_known_bug`): each input must finish within 5 s.
#[test]
fn known_hangs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions/known-hangs");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "md") {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            chains::run_with(&data, false);
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok(),
            "{} still hangs",
            path.display()
        );
    }
}

/// Builds a `descriptor_chains` input: header, then patches.
struct ChainInput(Vec<u8>);

impl ChainInput {
    fn new(flags: u8, tx_size_log2: u8, frames: &[u16]) -> Self {
        let mut v = vec![flags, tx_size_log2, 4, frames.len() as u8];
        for f in frames {
            v.extend_from_slice(&f.to_le_bytes());
        }
        ChainInput(v)
    }
    fn patch(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&(addr as u16).to_le_bytes());
        self.0.push(bytes.len() as u8);
        self.0.extend_from_slice(bytes);
        self
    }
    fn desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> &mut Self {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.patch(TX_DESC + 16 * u64::from(i), &d)
    }
    /// Avail ring of the TX queue: `heads`, idx = heads.len() (or `idx`).
    fn avail(&mut self, heads: &[u16], idx: Option<u16>) -> &mut Self {
        let mut a = vec![0, 0];
        a.extend_from_slice(&idx.unwrap_or(heads.len() as u16).to_le_bytes());
        for h in heads {
            a.extend_from_slice(&h.to_le_bytes());
        }
        self.patch(TX_AVAIL, &a)
    }
}

/// The hostile cases of tests/hostile.rs, in memory: none may panic or fault.
#[test]
fn hand_made_hostile_chains() {
    let end = 2 * chains::REGION as u64;
    // (name, input, check of the outcome)
    type Check = fn(&chains::Outcome) -> bool;
    let cases: Vec<(&str, ChainInput, Check)> = vec![
        (
            "good frame",
            {
                let mut c = ChainInput::new(F_VERSION_1, 4, &[]);
                c.desc(0, 0x8000, 100, 0, 0).avail(&[0], None);
                c
            },
            |o| o.tx_frames == 1 && o.tx_drops.is_empty(),
        ),
        (
            "across the two regions",
            {
                let mut c = ChainInput::new(F_VERSION_1, 4, &[]);
                c.desc(0, 0x8000 - 40, 100, 0, 0).avail(&[0], None);
                c
            },
            |o| o.tx_frames == 1,
        ),
        (
            "across the hole",
            {
                let mut c = ChainInput::new(F_VERSION_1 | F_HOLE, 4, &[]);
                c.desc(0, 0x8000 - 40, 100, 0, 0).avail(&[0], None);
                c
            },
            |o| o.drops("tx", "bad_address") == 1,
        ),
        (
            "outside and overflowing",
            {
                let mut c = ChainInput::new(F_VERSION_1, 4, &[]);
                c.desc(0, end + 10, 100, 0, 0)
                    .desc(1, end - 10, 100, 0, 0)
                    .desc(2, u64::MAX - 10, 100, 0, 0)
                    .avail(&[0, 1, 2], None);
                c
            },
            |o| o.drops("tx", "bad_address") == 3,
        ),
        (
            "loops and bad next",
            {
                let mut c = ChainInput::new(F_VERSION_1, 4, &[]);
                c.desc(0, 0x8000, 60, 1, 1)
                    .desc(1, 0x8000, 60, 1, 0)
                    .desc(2, 0x8000, 60, 1, 2)
                    .desc(3, 0x8000, 60, 1, 500)
                    .avail(&[0, 2, 3, 500], None);
                c
            },
            |o| o.drops("tx", "bad_chain") == 4,
        ),
        (
            "nested and bad indirect",
            {
                let mut c = ChainInput::new(F_VERSION_1, 4, &[]);
                let t = 0x6000u64;
                let mut nested = (t + 0x100).to_le_bytes().to_vec();
                nested.extend_from_slice(&32u32.to_le_bytes());
                nested.extend_from_slice(&4u16.to_le_bytes());
                nested.extend_from_slice(&0u16.to_le_bytes());
                c.patch(t, &nested)
                    .desc(0, t, 16, 4, 0)
                    .desc(1, t, 17, 4, 0)
                    .desc(2, t, 0, 4, 0)
                    .desc(3, end + 0x1000, 32, 4, 0)
                    .avail(&[0, 1, 2, 3], None);
                c
            },
            |o| o.drops("tx", "bad_chain") == 4,
        ),
        (
            "avail idx jump",
            {
                let mut c = ChainInput::new(F_VERSION_1, 4, &[]);
                c.desc(0, 0x8000, 100, 0, 0).avail(&[0], Some(1000));
                c
            },
            |o| o.tx_frames == 0 && o.tx_drops.is_empty(),
        ),
        (
            "RX with frames, mergeable, tiny and bad buffers",
            {
                let mut c = ChainInput::new(F_VERSION_1 | F_MRG_RXBUF, 4, &[1500, 60, 9000]);
                let rx = |i: u16, addr: u64, len: u32, flags: u16| {
                    let mut d = addr.to_le_bytes().to_vec();
                    d.extend_from_slice(&len.to_le_bytes());
                    d.extend_from_slice(&flags.to_le_bytes());
                    d.extend_from_slice(&0u16.to_le_bytes());
                    (chains::RX_DESC + 16 * u64::from(i), d)
                };
                for (i, (addr, len, flags)) in [
                    (end + 5, 2048u32, 2u16),
                    (0x9100, 2048, 0),
                    (0xa000, 2048, 2),
                    (0xb000, 4096, 2),
                    (0x9000, 1, 2),
                ]
                .into_iter()
                .enumerate()
                {
                    let (a, d) = rx(i as u16, addr, len, flags);
                    c.patch(a, &d);
                }
                c.patch(
                    chains::RX_AVAIL,
                    &[0, 0, 5, 0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0],
                );
                c
            },
            |o| {
                o.rx_frames >= 1
                    && o.drops("rx", "bad_address") == 1
                    && o.drops("rx", "wrong_direction") == 1
            },
        ),
    ];
    for (name, c, check) in cases {
        let o = chains::run(&c.0);
        eprintln!("case {name}: {o:?}");
        assert!(check(&o), "case {name}: {o:?}");
    }
}

/// Relay inputs: the fd flood and a memory table past the end of its memfd.
#[test]
fn hand_made_relay_inputs() {
    // 3 memfds of 64 bytes with every 1-byte chunk of a 76-byte SET_MEM_TABLE: before the
    // relay bounded fds per message, it forwarded all 228 of them (and held them meanwhile).
    let mut flood = vec![3 | (1 << 2), 4, 0, 4, 0, 4, 0];
    flood.extend_from_slice(&5u32.to_le_bytes());
    flood.extend_from_slice(&1u32.to_le_bytes());
    flood.extend_from_slice(&64u32.to_le_bytes());
    flood.extend_from_slice(&[0u8; 64]);
    relay::run(&flood);
    // SET_MEM_TABLE, one region of 4 KiB at offset 1 MiB of a 4 KiB memfd.
    let mut past = vec![1, 0, 1];
    past.extend_from_slice(&5u32.to_le_bytes());
    past.extend_from_slice(&1u32.to_le_bytes());
    past.extend_from_slice(&40u32.to_le_bytes());
    past.extend_from_slice(&1u32.to_le_bytes());
    past.extend_from_slice(&0u32.to_le_bytes());
    for v in [0u64, 4096, 0x7f00_0000_0000, 1 << 20] {
        past.extend_from_slice(&v.to_le_bytes());
    }
    relay::run(&past);
}
