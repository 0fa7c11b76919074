//! The userspace switch: vhost-user ports (and uplinks to host devices) attached to one
//! learning switch, so frames between two local VMs never cross the kernel.
//!
//! - [`Switch`]: its members, forwarding database ([`fdb`]) and counters. Forwarding runs on
//!   the sending member's own thread (a port's vring worker, an uplink's thread): it learns
//!   the source, looks up the destination, and copies the frame from the sender's buffers into
//!   each receiver's [`port::Inbox`], editing the VLAN tag and the virtio-net header on the way
//!   ([`frame_edit`]). There is no switch thread and no switch-wide lock on the data path: the
//!   member list and the table are read-locked (uncontended readers), and each inbox has its
//!   own short lock. The receiver's worker, woken by the inbox's eventfd, copies the frame
//!   into its guest's RX buffers. So a frame costs two copies (guest → inbox → guest), and an
//!   idle switch costs nothing: every thread sleeps in epoll.
//! - Learning: bounded table with aging (see [`fdb`]). Group and unknown destinations are
//!   flooded to every member on the VLAN but the sender, within the sender's storm-control
//!   budget. A frame is never sent back out of the member it came from.
//! - VLANs: a member is an access port (untagged, one VLAN; VLAN 0 when none is set) or a
//!   trunk (tagged, a list of VLANs); tags are pushed and popped as frames cross.
//! - Offloads: a frame keeps its virtio-net header, so a 64 KiB TSO frame between two guests
//!   that both negotiated TSO crosses as one frame. A receiver without checksum offload gets
//!   the checksum completed in software; one without the frame's segmentation offload does not
//!   get it (counted as `drop_offload`): the switch does not segment.
//! - Uplinks: tap or AF_PACKET host ports driven by a thread each ([`uplink`]).

pub mod fdb;
pub mod frame_edit;
pub mod port;
pub mod uplink;

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use self::fdb::{Fdb, FdbEntry, Learned};
use self::frame_edit::{copy_edited, is_group, write_edited, EthInfo, VlanMode, MAX_VLAN};
use self::port::{Inbox, RxSettings};
use crate::frame::{
    prepare_rx, prepare_tx, IovReader, IovWriter, VnetHdr, ETH_HLEN, VLAN_HLEN, VNET_HDR_LEN,
};

/// Default bound of the forwarding table.
pub const DEFAULT_FDB_MAX: usize = 8192;
/// Default aging time.
pub const DEFAULT_AGING_SECS: u64 = 300;
/// Default flood budget per member, frames per second (broadcast, multicast and unknown
/// unicast together).
pub const DEFAULT_FLOOD_PPS: u32 = 100_000;
/// Most switches one daemon runs.
pub const MAX_SWITCHES: usize = 64;
/// Most uplinks of one switch.
pub const MAX_UPLINKS: usize = 8;
/// Largest frame forwarded (a 64 KiB GSO frame plus headers).
const MAX_FRAME: usize = 65_550;

fn default_fdb_max() -> usize {
    DEFAULT_FDB_MAX
}
fn default_aging() -> u64 {
    DEFAULT_AGING_SECS
}
fn default_flood_pps() -> u32 {
    DEFAULT_FLOOD_PPS
}

/// Which host device an uplink drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UplinkKind {
    /// A tap device (created in the daemon's network namespace if missing).
    Tap,
    /// An existing interface through AF_PACKET sockets.
    AfPacket,
}

/// An uplink: a host device whose traffic joins the switch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkSpec {
    /// Device kind.
    pub kind: UplinkKind,
    /// Interface name.
    pub name: String,
    /// Access VLAN (untagged on the device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// Trunk VLANs (tagged on the device).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trunk: Vec<u16>,
}

/// One switch (`[[switch]]` in a config file, `ctl add-switch`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSpec {
    /// Unique name, used by ports' `host = { kind = "switch", name = ... }`.
    pub name: String,
    /// Most addresses learned at once; more are not learned (and counted).
    #[serde(default = "default_fdb_max")]
    pub fdb_max: usize,
    /// Seconds an address is remembered after it was last seen.
    #[serde(default = "default_aging")]
    pub aging_secs: u64,
    /// Storm control: most flooded frames per second from one member (0: no limit).
    #[serde(default = "default_flood_pps")]
    pub flood_pps: u32,
    /// Host devices attached to the switch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uplinks: Vec<UplinkSpec>,
}

/// Switch configuration and management errors.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// A setting is out of range.
    #[error("switch {switch:?}: {message}")]
    Invalid {
        /// Switch name.
        switch: String,
        /// What is wrong.
        message: String,
    },
    /// No switch of that name.
    #[error("no switch named {0:?}")]
    NotFound(String),
    /// A switch of that name exists.
    #[error("a switch named {0:?} already exists")]
    Duplicate(String),
    /// Ports still use it.
    #[error("switch {0:?} still has ports attached: {1}; remove them first")]
    Busy(String, String),
    /// Too many switches.
    #[error("this daemon already runs {MAX_SWITCHES} switches")]
    TooMany,
    /// An uplink could not be opened or started.
    #[error("switch {switch:?}: uplink {uplink}: {message}")]
    Uplink {
        /// Switch name.
        switch: String,
        /// Uplink interface.
        uplink: String,
        /// What failed.
        message: String,
    },
    /// An eventfd could not be made.
    #[error("cannot create an eventfd: {0}")]
    Io(#[from] io::Error),
}

/// Checks a member's `vlan`/`trunk` settings; the error says what is wrong.
pub fn check_vlans(vlan: Option<u16>, trunk: &[u16]) -> Result<(), String> {
    if vlan.is_some() && !trunk.is_empty() {
        return Err("vlan (access) and trunk exclude each other".into());
    }
    let bad = |v: &u16| !(1..=MAX_VLAN).contains(v);
    if let Some(v) = vlan.filter(bad) {
        return Err(format!("vlan {v} is outside 1..={MAX_VLAN}"));
    }
    if let Some(v) = trunk.iter().find(|v| bad(v)) {
        return Err(format!("trunk vlan {v} is outside 1..={MAX_VLAN}"));
    }
    if trunk.len() > usize::from(MAX_VLAN) {
        return Err("too many trunk vlans".into());
    }
    Ok(())
}

impl SwitchSpec {
    /// A switch called `name` with the default settings and no uplink.
    pub fn named(name: &str) -> SwitchSpec {
        SwitchSpec {
            name: name.into(),
            fdb_max: DEFAULT_FDB_MAX,
            aging_secs: DEFAULT_AGING_SECS,
            flood_pps: DEFAULT_FLOOD_PPS,
            uplinks: Vec::new(),
        }
    }

    fn invalid(&self, message: impl Into<String>) -> SwitchError {
        SwitchError::Invalid {
            switch: self.name.clone(),
            message: message.into(),
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), SwitchError> {
        if !crate::config::name_ok(&self.name) {
            return Err(self.invalid("name must be 1-64 characters of [A-Za-z0-9._-]"));
        }
        if !(1..=1 << 20).contains(&self.fdb_max) {
            return Err(self.invalid("fdb_max must be 1 to 1048576"));
        }
        if !(1..=1_000_000).contains(&self.aging_secs) {
            return Err(self.invalid("aging_secs must be 1 to 1000000"));
        }
        if self.uplinks.len() > MAX_UPLINKS {
            return Err(self.invalid(format!("at most {MAX_UPLINKS} uplinks")));
        }
        for (i, u) in self.uplinks.iter().enumerate() {
            crate::netdev::IfName::new(&u.name).map_err(|e| self.invalid(e.to_string()))?;
            check_vlans(u.vlan, &u.trunk)
                .map_err(|m| self.invalid(format!("uplink {}: {m}", u.name)))?;
            if self.uplinks[..i].iter().any(|o| o.name == u.name) {
                return Err(self.invalid(format!("uplink {} given twice", u.name)));
            }
        }
        Ok(())
    }
}

macro_rules! member_counters {
    ($($name:ident: $help:literal,)*) => {
        /// Counters of one switch member.
        #[derive(Debug, Default)]
        pub struct MemberCounters {
            $(#[doc = $help] pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of a member's counters.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct MemberSnapshot {
            /// The switch.
            pub switch: String,
            /// Member name (the port, or `uplink:IFNAME`).
            pub member: String,
            $(#[doc = $help] #[serde(default)] pub $name: u64,)*
        }

        impl MemberSnapshot {
            /// Every counter as `(name, description, value)`, in a fixed order.
            pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name),)*]
            }
        }

        impl MemberCounters {
            /// The counters as plain numbers.
            pub fn snapshot(&self, switch: &str, member: &str) -> MemberSnapshot {
                MemberSnapshot {
                    switch: switch.into(),
                    member: member.into(),
                    $($name: self.$name.load(Relaxed),)*
                }
            }
        }
    };
}

member_counters! {
    forwarded: "Frames from this member delivered to the one member their destination was learned on.",
    flooded: "Frames from this member flooded (broadcast, multicast, unknown unicast).",
    received: "Frames queued for this member by the switch.",
    learned: "Addresses learned on this member (new, or moved here).",
    learn_refused: "Source addresses not learned because the table was full.",
    drop_vlan: "Frames from this member refused by its VLAN mode (tagged on an access port, \
        untagged or of another VLAN on a trunk).",
    drop_bad_source: "Frames from this member with a group source address.",
    drop_malformed: "Frames from this member too short or with a bad virtio-net header.",
    drop_same_member: "Frames from this member for an address learned on this member (never \
        sent back).",
    drop_storm: "Flooded frames from this member over its storm-control budget.",
    drop_inbox_full: "Frames for this member dropped because its inbox was full.",
    drop_offload: "Frames for this member needing a segmentation offload its guest did not \
        negotiate.",
    drop_not_running: "Frames for this member while no frontend ran its queues.",
}

/// A member of a switch: a vhost-user port or an uplink.
pub struct Member {
    /// Id in the switch (never reused while the switch lives).
    pub id: u32,
    /// Name: the port's, or `uplink:IFNAME`.
    pub name: String,
    vlan: VlanMode,
    /// Frames waiting for this member.
    pub inbox: Inbox,
    /// What this member's receiver accepts.
    pub rx: RxSettings,
    /// Counters.
    pub counters: MemberCounters,
    storm: Mutex<Bucket>,
    /// A port's device, to deliver switched frames from the sender's thread
    /// ([`vhost_net_backend::NetBackend::poll_rx`]); none for uplinks.
    device: std::sync::OnceLock<std::sync::Weak<vhost_net_backend::NetBackend>>,
}

/// A token bucket of flooded frames per second.
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Member {
    fn new(id: u32, name: String, vlan: VlanMode) -> io::Result<Member> {
        Ok(Member {
            id,
            name,
            vlan,
            inbox: Inbox::new()?,
            rx: RxSettings::default(),
            counters: MemberCounters::default(),
            storm: Mutex::new(Bucket {
                tokens: 0.0,
                last: Instant::now(),
            }),
            device: std::sync::OnceLock::new(),
        })
    }

    /// Ties a port member to its device (once: a member belongs to one port).
    pub fn set_device(&self, d: &Arc<vhost_net_backend::NetBackend>) {
        let _ = self.device.set(Arc::downgrade(d));
    }

    /// The port's device, while it lives.
    fn device(&self) -> Option<Arc<vhost_net_backend::NetBackend>> {
        self.device.get().and_then(std::sync::Weak::upgrade)
    }

    /// Delivers what waits in the inbox to the port's guest from this thread, if the port's
    /// worker is free (otherwise its own thread, woken by the inbox, does it).
    pub fn deliver_now(&self) {
        if let Some(d) = self.device() {
            d.poll_rx(0);
        }
    }

    /// Takes one token of `pps` (burst: a tenth of a second's worth, at least 64).
    fn may_flood(&self, pps: u32) -> bool {
        if pps == 0 {
            return true;
        }
        let mut b = self.storm.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let burst = (f64::from(pps) / 10.0).max(64.0);
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.last = now;
        b.tokens = (b.tokens + elapsed * f64::from(pps)).min(burst);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A switch.
pub struct Switch {
    spec: SwitchSpec,
    fdb: Fdb,
    members: RwLock<Vec<Arc<Member>>>,
    next_id: AtomicU32,
    uplinks: Mutex<Vec<uplink::Uplink>>,
}

impl Switch {
    /// A switch without uplinks (see [`Switch::start`]).
    fn new(spec: SwitchSpec) -> Switch {
        Switch {
            fdb: Fdb::new(spec.fdb_max, Duration::from_secs(spec.aging_secs)),
            spec,
            members: RwLock::new(Vec::new()),
            next_id: AtomicU32::new(1),
            uplinks: Mutex::new(Vec::new()),
        }
    }

    /// Builds the switch and starts its uplinks.
    pub fn start(spec: SwitchSpec) -> Result<Arc<Switch>, SwitchError> {
        spec.validate()?;
        let sw = Arc::new(Switch::new(spec));
        let mut ups = Vec::new();
        for u in &sw.spec.uplinks {
            match uplink::Uplink::start(&sw, u) {
                Ok(up) => ups.push(up),
                Err(message) => {
                    for up in ups {
                        up.stop();
                    }
                    return Err(SwitchError::Uplink {
                        switch: sw.spec.name.clone(),
                        uplink: u.name.clone(),
                        message,
                    });
                }
            }
        }
        *sw.uplinks.lock().unwrap_or_else(PoisonError::into_inner) = ups;
        tracing::info!(switch = %sw.spec.name, uplinks = sw.spec.uplinks.len(), "switch ready");
        Ok(sw)
    }

    /// Stops the uplinks.
    pub fn stop(&self) {
        let ups = std::mem::take(&mut *self.uplinks.lock().unwrap_or_else(PoisonError::into_inner));
        for up in ups {
            up.stop();
        }
    }

    /// Its settings.
    pub fn spec(&self) -> &SwitchSpec {
        &self.spec
    }

    /// Adds a member named `name` with VLAN mode `vlan`.
    pub fn attach(&self, name: &str, vlan: VlanMode) -> io::Result<Arc<Member>> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let m = Arc::new(Member::new(id, name.into(), vlan)?);
        self.members
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(m.clone());
        Ok(m)
    }

    /// Removes member `id` and forgets its addresses.
    pub fn detach(&self, id: u32) {
        self.members
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|m| m.id != id);
        self.fdb.forget_member(id);
    }

    /// Names of the ports (not uplinks) attached.
    pub fn port_names(&self) -> Vec<String> {
        self.members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|m| !m.name.starts_with("uplink:"))
            .map(|m| m.name.clone())
            .collect()
    }

    /// Counters of every member.
    pub fn snapshots(&self) -> Vec<MemberSnapshot> {
        self.members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|m| m.counters.snapshot(&self.spec.name, &m.name))
            .collect()
    }

    /// The forwarding table, with member names.
    pub fn fdb(&self) -> Vec<FdbView> {
        let names: BTreeMap<u32, String> = self
            .members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|m| (m.id, m.name.clone()))
            .collect();
        self.fdb
            .entries()
            .into_iter()
            .map(|e: FdbEntry| FdbView {
                member: names.get(&e.member).cloned().unwrap_or_default(),
                vlan: e.vlan,
                mac: e.mac,
                age_secs: e.age_secs,
            })
            .collect()
    }

    /// Decides where one frame from member `from` goes, read from `iov` (a virtio-net header
    /// of `hdr_len` bytes first): learns its source and calls `each` with every receiver
    /// (none when it is dropped for storm control or would go back to `from`). Returns the
    /// frame, or `InvalidInput` for a frame the switch refuses outright (malformed, bad
    /// source, wrong VLAN), counted on `from`.
    ///
    /// # Safety
    /// Every entry of `iov` must be valid for reads for its whole length.
    pub unsafe fn decide(
        &self,
        from: &Member,
        iov: &[libc::iovec],
        hdr_len: usize,
        mut each: impl FnMut(&Arc<Member>, &Frame),
    ) -> io::Result<Frame> {
        let c = &from.counters;
        let total = crate::frame::iov_len(iov);
        let refuse = |counter: &AtomicU64| {
            counter.fetch_add(1, Relaxed);
            Err(io::Error::from(io::ErrorKind::InvalidInput))
        };
        if total < hdr_len + ETH_HLEN || total - hdr_len > MAX_FRAME || hdr_len < VNET_HDR_LEN {
            return refuse(&c.drop_malformed);
        }
        let frame_len = total - hdr_len;
        let mut head = [0u8; VNET_HDR_LEN + ETH_HLEN + VLAN_HLEN];
        let want = (VNET_HDR_LEN + frame_len).min(head.len());
        let mut r = IovReader::new(iov);
        // SAFETY: the caller vouches for `iov`; `head` is ours.
        unsafe {
            r.read(&mut head[..VNET_HDR_LEN]);
            r.read_raw(std::ptr::null_mut(), hdr_len - VNET_HDR_LEN);
            r.read(&mut head[VNET_HDR_LEN..want]);
        }
        let mut hb = [0u8; VNET_HDR_LEN];
        hb.copy_from_slice(&head[..VNET_HDR_LEN]);
        let hdr = VnetHdr::parse(&hb);
        // The same checks a tap would make (GSO type, segment size, checksum offsets).
        if prepare_tx(&mut { hdr }, frame_len, false).is_err() {
            return refuse(&c.drop_malformed);
        }
        let Some(eth) = EthInfo::parse(&head[VNET_HDR_LEN..want]) else {
            return refuse(&c.drop_malformed);
        };
        let Some(vid) = from.vlan.ingress(eth.tag) else {
            return refuse(&c.drop_vlan);
        };
        if is_group(&eth.src) {
            return refuse(&c.drop_bad_source);
        }
        let now = self.fdb.now();
        match self.fdb.learn(vid, &eth.src, from.id, now) {
            Learned::New | Learned::Moved => {
                c.learned.fetch_add(1, Relaxed);
            }
            Learned::Full => {
                c.learn_refused.fetch_add(1, Relaxed);
            }
            Learned::Refreshed => {}
        }
        let to = if is_group(&eth.dst) {
            None
        } else {
            self.fdb.lookup(vid, &eth.dst, now)
        };
        let frame = Frame {
            total,
            hdr_len,
            hdr,
            frame_len,
            tagged_in: eth.tag.is_some(),
            vid,
        };
        let members = self.members.read().unwrap_or_else(PoisonError::into_inner);
        match to {
            Some(id) if id == from.id => {
                c.drop_same_member.fetch_add(1, Relaxed);
            }
            Some(id) if members.iter().any(|m| m.id == id) => {
                if let Some(m) = members.iter().find(|m| m.id == id) {
                    c.forwarded.fetch_add(1, Relaxed);
                    each(m, &frame);
                }
            }
            _ => {
                if !from.may_flood(self.spec.flood_pps) {
                    c.drop_storm.fetch_add(1, Relaxed);
                } else {
                    c.flooded.fetch_add(1, Relaxed);
                    for m in members
                        .iter()
                        .filter(|m| m.id != from.id && m.vlan.carries(vid))
                    {
                        each(m, &frame);
                    }
                }
            }
        }
        Ok(frame)
    }

    /// Forwards one frame from member `from` at once, through the receivers' inboxes (see
    /// [`Switch::decide`]); receivers given frames are added to `touched` (once each), for the
    /// caller to [`Member::deliver_now`] after its burst. Returns the length taken.
    ///
    /// # Safety
    /// Every entry of `iov` must be valid for reads for its whole length.
    pub unsafe fn forward(
        &self,
        from: &Member,
        iov: &[libc::iovec],
        hdr_len: usize,
        touched: &mut Vec<Arc<Member>>,
    ) -> io::Result<usize> {
        // SAFETY: the caller vouches for `iov`, read by `decide` and by every delivery.
        let f = unsafe {
            self.decide(from, iov, hdr_len, |m, f| {
                if self.deliver(m, iov, f, true) && !touched.iter().any(|t| t.id == m.id) {
                    touched.push(m.clone());
                }
            })
        }?;
        Ok(f.total)
    }

    /// Delivers frames staged by a sender (`frames[i]` read from `iovs[frames[i].iov]`) to
    /// `to`: straight from the sender's buffers into the receiver's guest RX buffers, one
    /// copy, when its worker is free and nothing older waits in its inbox; through the inbox
    /// for the rest (a busy worker, a guest out of buffers, a checksum to complete in
    /// software), with its worker then asked to take them.
    ///
    /// # Safety
    /// The iovecs of the staged frames must be valid for reads for their whole length.
    pub unsafe fn deliver_staged(
        &self,
        to: &Member,
        staged: &[(std::ops::Range<usize>, Frame)],
        iovs: &[libc::iovec],
        which: &[u32],
    ) {
        let c = &to.counters;
        if !to.rx.running.load(Relaxed) {
            c.drop_not_running.fetch_add(which.len() as u64, Relaxed);
            return;
        }
        let mut next = 0;
        if to.inbox.is_empty() {
            if let Some(dev) = to.device() {
                let offloads = to.rx.offloads();
                let hdr_len = to.rx.hdr_len();
                let tags = to.vlan.tags();
                let mut src = |out: &[libc::iovec]| -> io::Result<usize> {
                    while let Some(&i) = which.get(next) {
                        let (range, f) = &staged[i as usize];
                        let h = match frame_edit::rx_header(f, offloads) {
                            frame_edit::RxHeader::Direct(h) => h,
                            frame_edit::RxHeader::Refused => {
                                c.drop_offload.fetch_add(1, Relaxed);
                                next += 1;
                                continue;
                            }
                            // Software checksum: this frame and the rest go through the inbox.
                            frame_edit::RxHeader::Complete => break,
                        };
                        next += 1;
                        let mut r = IovReader::new(&iovs[range.clone()]);
                        let mut w = IovWriter::new(out);
                        // SAFETY: the caller vouches for the sender's iovecs; the worker hands
                        // over its guest's RX buffers for this call; they are different guests'
                        // memory, or different buffers of one.
                        let written = unsafe {
                            r.read_raw(std::ptr::null_mut(), f.hdr_len);
                            write_edited(
                                &mut r,
                                h,
                                f.frame_len,
                                f.tagged_in,
                                tags.then_some(f.vid),
                                hdr_len,
                                &mut w,
                            )
                        };
                        return match written {
                            Ok(n) => {
                                c.received.fetch_add(1, Relaxed);
                                Ok(n)
                            }
                            Err(_) => Err(io::ErrorKind::InvalidInput.into()),
                        };
                    }
                    Err(io::ErrorKind::WouldBlock.into())
                };
                dev.deliver_with(0, &mut src);
            }
        }
        if next == which.len() {
            return;
        }
        for &i in &which[next..] {
            let (range, f) = &staged[i as usize];
            // SAFETY: as above.
            unsafe { self.deliver(to, &iovs[range.clone()], f, false) };
        }
        to.deliver_now();
        if !to.inbox.is_empty() {
            to.inbox.signal();
        }
    }

    /// Copies one frame (`f`, read from `iov`) into `to`'s inbox, edited for it; true when
    /// it was queued. With `wake`, an inbox that was empty signals its eventfd.
    ///
    /// # Safety
    /// Every entry of `iov` must be valid for reads for its whole length.
    unsafe fn deliver(&self, to: &Member, iov: &[libc::iovec], f: &Frame, wake: bool) -> bool {
        let c = &to.counters;
        if !to.rx.running.load(Relaxed) {
            c.drop_not_running.fetch_add(1, Relaxed);
            return false;
        }
        let mut buf = to.inbox.buffer();
        let tag_out = to.vlan.tags().then_some(f.vid);
        let mut reader = IovReader::new(iov);
        // SAFETY: the caller vouches for `iov`.
        let edited = unsafe {
            reader.read_raw(std::ptr::null_mut(), f.hdr_len);
            copy_edited(
                &mut reader,
                f.hdr,
                f.frame_len,
                f.tagged_in,
                tag_out,
                &mut buf,
            )
        };
        let Ok(mut h) = edited else {
            to.inbox.give_back(buf);
            return false;
        };
        if prepare_rx(&mut h, &mut buf[VNET_HDR_LEN..], to.rx.offloads(), false).is_err() {
            c.drop_offload.fetch_add(1, Relaxed);
            to.inbox.give_back(buf);
            return false;
        }
        buf[..VNET_HDR_LEN].copy_from_slice(&h.to_bytes());
        match to.inbox.push(buf, wake) {
            Ok(()) => {
                c.received.fetch_add(1, Relaxed);
                true
            }
            Err(buf) => {
                c.drop_inbox_full.fetch_add(1, Relaxed);
                to.inbox.give_back(buf);
                false
            }
        }
    }
}

/// One frame as forwarding sees it.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    /// Bytes taken from the sender, header included.
    pub total: usize,
    /// The sender's virtio-net header length.
    pub hdr_len: usize,
    /// The sender's virtio-net header.
    pub hdr: VnetHdr,
    /// Ethernet frame length.
    pub frame_len: usize,
    /// The frame carries an 802.1Q tag.
    pub tagged_in: bool,
    /// Its VLAN.
    pub vid: u16,
}

/// A forwarding table entry as `ctl fdb` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdbView {
    /// VLAN id (0: the untagged network).
    pub vlan: u16,
    /// The address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Name of the member it was learned on (a port, or `uplink:IFNAME`).
    pub member: String,
    /// Seconds since it was last seen.
    pub age_secs: u64,
}

/// The switches of one daemon.
#[derive(Default)]
pub struct SwitchSet {
    switches: Mutex<BTreeMap<String, Arc<Switch>>>,
}

impl SwitchSet {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Switch>>> {
        self.switches.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a switch.
    pub fn add(&self, spec: SwitchSpec) -> Result<(), SwitchError> {
        spec.validate()?;
        {
            let s = self.lock();
            if s.contains_key(&spec.name) {
                return Err(SwitchError::Duplicate(spec.name));
            }
            if s.len() >= MAX_SWITCHES {
                return Err(SwitchError::TooMany);
            }
        }
        let sw = Switch::start(spec)?;
        let mut s = self.lock();
        if s.contains_key(&sw.spec.name) {
            sw.stop();
            return Err(SwitchError::Duplicate(sw.spec.name.clone()));
        }
        s.insert(sw.spec.name.clone(), sw);
        Ok(())
    }

    /// Stops a switch no port uses.
    pub fn remove(&self, name: &str) -> Result<(), SwitchError> {
        let mut s = self.lock();
        let sw = s
            .get(name)
            .ok_or_else(|| SwitchError::NotFound(name.into()))?;
        let ports = sw.port_names();
        if !ports.is_empty() {
            return Err(SwitchError::Busy(name.into(), ports.join(", ")));
        }
        if let Some(sw) = s.remove(name) {
            sw.stop();
        }
        tracing::info!(switch = name, "switch removed");
        Ok(())
    }

    /// The switch called `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Switch>, SwitchError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| SwitchError::NotFound(name.into()))
    }

    /// Every switch's settings.
    pub fn specs(&self) -> Vec<SwitchSpec> {
        self.lock().values().map(|s| s.spec.clone()).collect()
    }

    /// Every member's counters, all switches.
    pub fn snapshots(&self) -> Vec<MemberSnapshot> {
        self.lock().values().flat_map(|s| s.snapshots()).collect()
    }

    /// Stops every switch.
    pub fn stop_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        for s in all.values() {
            s.stop();
        }
    }
}
