//! Prometheus text exposition of every port's counters, served over HTTP on `--metrics ADDR`
//! (`HOST:PORT`, or `unix:PATH`).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::endpoint::{self, Limits, Slot};

use crate::af_packet::{AfPacketSnapshot, LinkState};
use crate::ports::{DirectionSnapshot, PortRegistry, PortStats, QueuePairStats};
use crate::switch::MemberSnapshot;

/// `v` escaped for use as a label value (backslash, double quote and newline).
fn label(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 2);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Renders the counters in Prometheus text format 0.0.4: every port's, and every switch
/// member's (ports and uplinks) in `members`.
pub fn render(ports: &[PortStats], members: &[MemberSnapshot]) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, kind: &str, lines: &mut dyn FnMut(&mut String)| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        lines(&mut out);
    };
    let each = |f: &mut dyn FnMut(&mut String, &str, usize, &str, &DirectionSnapshot),
                o: &mut String| {
        for p in ports {
            for (q, s) in p.queues.iter().enumerate() {
                f(o, &p.name, q, "rx", &s.rx);
                f(o, &p.name, q, "tx", &s.tx);
            }
        }
    };
    family(
        "vhost_pump_port_connected",
        "1 while a frontend is connected.",
        "gauge",
        &mut |o| {
            for p in ports {
                let _ = writeln!(
                    o,
                    "vhost_pump_port_connected{{port=\"{}\"}} {}",
                    p.name,
                    u8::from(p.connected)
                );
            }
        },
    );
    for (stem, help, value) in DirectionSnapshot::COUNTERS {
        let name = format!("vhost_pump_{stem}_total");
        family(&name, help, "counter", &mut |o| {
            each(
                &mut |o, port, q, dir, d| {
                    let n = value(d);
                    let _ = writeln!(
                        o,
                        "{name}{{port=\"{port}\",queue=\"{q}\",dir=\"{dir}\"}} {n}"
                    );
                },
                o,
            )
        });
    }
    family(
        "vhost_pump_drops_total",
        "Frames or descriptor chains dropped, by reason.",
        "counter",
        &mut |o| {
            each(
                &mut |o, port, q, dir, d| {
                    for (reason, n) in &d.drops {
                        let _ = writeln!(o, "vhost_pump_drops_total{{port=\"{port}\",queue=\"{q}\",dir=\"{dir}\",reason=\"{reason}\"}} {n}");
                    }
                },
                o,
            )
        },
    );
    // The wake-up counters are one family told apart by `kind`.
    let (wakeups, others): (Vec<_>, Vec<_>) = QueuePairStats::COUNTERS
        .into_iter()
        .partition(|(stem, _, _)| stem.ends_with("_wakeups"));
    for (stem, help, value) in others {
        let name = format!("vhost_pump_{stem}_total");
        family(&name, help, "counter", &mut |o| {
            for p in ports {
                for (q, s) in p.queues.iter().enumerate() {
                    let _ = writeln!(
                        o,
                        "{name}{{port=\"{}\",queue=\"{q}\"}} {}",
                        p.name,
                        value(s)
                    );
                }
            }
        });
    }
    family(
        "vhost_pump_wakeups_total",
        "Worker wake-ups that found work (busy) or none (idle).",
        "counter",
        &mut |o| {
            for p in ports {
                for (q, s) in p.queues.iter().enumerate() {
                    for (stem, _, value) in &wakeups {
                        let kind = stem.trim_end_matches("_wakeups");
                        let _ = writeln!(
                            o,
                            "vhost_pump_wakeups_total{{port=\"{}\",queue=\"{q}\",kind=\"{kind}\"}} {}",
                            p.name,
                            value(s)
                        );
                    }
                }
            }
        },
    );
    family(
        "vhost_pump_session_events_total",
        "Session events: sessions started, peers refused on the private request-handler \
         channel, frontends disconnected for not reading, sessions over their fd budget.",
        "counter",
        &mut |o| {
            for p in ports {
                for (event, _, n) in p.sessions.counters() {
                    let _ = writeln!(
                        o,
                        "vhost_pump_session_events_total{{port=\"{}\",event=\"{event}\"}} {n}",
                        label(&p.name)
                    );
                }
            }
        },
    );
    // AF_PACKET ports only: no families at all when there is none.
    let afp: Vec<(&str, &AfPacketSnapshot)> = ports
        .iter()
        .filter_map(|p| p.af_packet.as_ref().map(|a| (p.name.as_str(), a)))
        .collect();
    if let Some((_, first)) = afp.first() {
        family(
            "vhost_pump_af_packet_link_up",
            "1 while the AF_PACKET port's interface is up, 0 while it is down or gone.",
            "gauge",
            &mut |o| {
                for (port, a) in &afp {
                    let _ = writeln!(
                        o,
                        "vhost_pump_af_packet_link_up{{port=\"{}\",interface=\"{}\"}} {}",
                        label(port),
                        label(&a.interface),
                        u8::from(a.link == LinkState::Up)
                    );
                }
            },
        );
        for (i, (counter, help, _)) in first.counters().into_iter().enumerate() {
            let name = format!("vhost_pump_af_packet_{counter}_total");
            family(&name, help, "counter", &mut |o| {
                for (port, a) in &afp {
                    let _ = writeln!(
                        o,
                        "{name}{{port=\"{}\",interface=\"{}\"}} {}",
                        label(port),
                        label(&a.interface),
                        a.counters()[i].2
                    );
                }
            });
        }
    }
    // Switch members only: no families at all without a switch.
    if let Some(first) = members.first() {
        for (i, (counter, help, _)) in first.counters().into_iter().enumerate() {
            let name = format!("vhost_pump_switch_{counter}_total");
            family(&name, help, "counter", &mut |o| {
                for m in members {
                    let _ = writeln!(
                        o,
                        "{name}{{switch=\"{}\",member=\"{}\"}} {}",
                        label(&m.switch),
                        label(&m.member),
                        m.counters()[i].2
                    );
                }
            });
        }
    }
    out
}

/// Errors starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct MetricsError {
    addr: String,
    #[source]
    source: std::io::Error,
}

/// Most metrics connections open at once.
pub const MAX_CONNS: usize = 64;
/// How long a client has to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Listen backlog of a TCP metrics endpoint.
const TCP_BACKLOG: libc::c_int = 1024;

const LIMITS: Limits = Limits {
    max_conns: MAX_CONNS,
    read_timeout: READ_TIMEOUT,
    write_timeout: WRITE_TIMEOUT,
};

/// Sent to a connection turned away because every connection is being answered.
const REFUSAL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Serves `GET /metrics` on `addr` from a background thread, within [`MAX_CONNS`] connections
/// and the [`READ_TIMEOUT`] / [`WRITE_TIMEOUT`] a client gets (see [`crate::endpoint`]).
pub fn spawn(addr: &str, registry: Arc<PortRegistry>) -> Result<(), MetricsError> {
    let err = |source| MetricsError {
        addr: addr.into(),
        source,
    };
    enum Bound {
        Tcp(std::net::TcpListener),
        Unix(std::os::unix::net::UnixListener),
    }
    let bound = match addr.strip_prefix("unix:") {
        Some(path) => {
            let l = crate::server::bind(std::path::Path::new(path))
                .map_err(|e| err(std::io::Error::other(e.to_string())))?;
            Bound::Unix(l)
        }
        None => {
            use std::os::fd::AsRawFd;
            let l = std::net::TcpListener::bind(addr).map_err(err)?;
            // std listens with a backlog of 128: a burst of connections arriving while this
            // thread waits for a CPU overflows it and costs each client a 1 s SYN
            // retransmission. Listening again only changes the backlog (the kernel caps it at
            // net.core.somaxconn; a Unix socket gets that cap from std already).
            // SAFETY: listen on the listener's own open fd; it takes plain integers.
            if unsafe { libc::listen(l.as_raw_fd(), TCP_BACKLOG) } != 0 {
                return Err(err(std::io::Error::last_os_error()));
            }
            Bound::Tcp(l)
        }
    };
    match &bound {
        Bound::Tcp(l) => l.set_nonblocking(true),
        Bound::Unix(l) => l.set_nonblocking(true),
    }
    .map_err(err)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "metrics endpoint runtime failed");
                    return;
                }
            };
            rt.block_on(async move {
                let r = registry;
                let unusable = |e: std::io::Error| {
                    tracing::error!(error = %e, "metrics endpoint unusable");
                };
                match bound {
                    Bound::Tcp(l) => match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            let h =
                                move |c: tokio::net::TcpStream, slot| answer(c, slot, r.clone());
                            endpoint::serve("metrics", l, LIMITS, REFUSAL, h).await;
                        }
                        Err(e) => unusable(e),
                    },
                    Bound::Unix(l) => match tokio::net::UnixListener::from_std(l) {
                        Ok(l) => {
                            let h =
                                move |c: tokio::net::UnixStream, slot| answer(c, slot, r.clone());
                            endpoint::serve("metrics", l, LIMITS, REFUSAL, h).await;
                        }
                        Err(e) => unusable(e),
                    },
                }
            });
        })
        .map_err(err)?;
    Ok(())
}

/// Answers one HTTP request: `/metrics` gets the counters, anything else a 404.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    slot: Slot,
    registry: Arc<PortRegistry>,
) {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    let read = tokio::time::timeout(slot.limits().read_timeout, async {
        while n < buf.len() {
            match s.read(&mut buf[n..]).await {
                Ok(0) => return Ok(()),
                Err(e) => return Err(e),
                Ok(k) => n += k,
            }
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        Ok(())
    })
    .await;
    match read {
        Err(_) => return slot.trouble("no request within the read timeout", None),
        Ok(Err(e)) => return slot.trouble("cannot read the request", Some(&e)),
        Ok(Ok(())) if n == 0 => return,
        Ok(Ok(())) => {}
    }
    slot.answering();
    let head = String::from_utf8_lossy(&buf[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if head.starts_with("GET ") && (path == "/metrics" || path == "/") {
        (
            "200 OK",
            render(
                &registry.stats(None).unwrap_or_default(),
                &registry.switches().snapshots(),
            ),
        )
    } else {
        ("404 Not Found", "not found\n".to_string())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let written = tokio::time::timeout(slot.limits().write_timeout, async {
        s.write_all(resp.as_bytes()).await?;
        s.shutdown().await
    })
    .await;
    match written {
        Err(_) => slot.trouble("response not taken within the write timeout", None),
        Ok(Err(e)) => slot.trouble("cannot send the response", Some(&e)),
        Ok(Ok(())) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::QueuePairStats;

    #[test]
    fn renders_counters_with_labels() {
        let d = |frames| DirectionSnapshot {
            frames,
            bytes: frames * 100,
            notifications: 1,
            drops: [("runt".to_string(), 2u64)].into_iter().collect(),
        };
        let p = PortStats {
            name: "vm0".into(),
            socket: "/s".into(),
            connected: true,
            started_ns: 0,
            acked_features: 0,
            sessions: crate::server::SessionStats {
                stalled_frontends: 2,
                ..Default::default()
            },
            queues: vec![QueuePairStats {
                rx: d(5),
                tx: d(7),
                busy_wakeups: 3,
                idle_wakeups: 4,
                rx_ring_full: 6,
            }],
            af_packet: None,
            switch: None,
        };
        let text = render(&[p], &[]);
        assert!(
            !text.contains("af_packet"),
            "tap port with AF_PACKET metrics:\n{text}"
        );
        for want in [
            "# TYPE vhost_pump_frames_total counter",
            "vhost_pump_port_connected{port=\"vm0\"} 1",
            "vhost_pump_frames_total{port=\"vm0\",queue=\"0\",dir=\"rx\"} 5",
            "vhost_pump_bytes_total{port=\"vm0\",queue=\"0\",dir=\"tx\"} 700",
            "vhost_pump_drops_total{port=\"vm0\",queue=\"0\",dir=\"tx\",reason=\"runt\"} 2",
            "vhost_pump_wakeups_total{port=\"vm0\",queue=\"0\",kind=\"idle\"} 4",
            "vhost_pump_rx_ring_full_total{port=\"vm0\",queue=\"0\"} 6",
            "vhost_pump_session_events_total{port=\"vm0\",event=\"stalled_frontends\"} 2",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn renders_switch_members_only_with_a_switch() {
        assert!(!render(&[], &[]).contains("vhost_pump_switch_"));
        let m = |member: &str, base: u64| MemberSnapshot {
            switch: "sw0".into(),
            member: member.into(),
            forwarded: base + 1,
            drop_inbox_full: base + 2,
            ..Default::default()
        };
        let text = render(&[], &[m("vm0", 0), m("uplink:up\"0", 10)]);
        for line in [
            "# TYPE vhost_pump_switch_forwarded_total counter",
            "vhost_pump_switch_forwarded_total{switch=\"sw0\",member=\"vm0\"} 1",
            "vhost_pump_switch_drop_inbox_full_total{switch=\"sw0\",member=\"vm0\"} 2",
            "vhost_pump_switch_forwarded_total{switch=\"sw0\",member=\"uplink:up\\\"0\"} 11",
            "vhost_pump_switch_learn_refused_total{switch=\"sw0\",member=\"vm0\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // One family per counter, each declared once.
        let families = text
            .lines()
            .filter(|l| l.starts_with("# TYPE vhost_pump_switch_"))
            .count();
        assert_eq!(families, m("x", 0).counters().len());
    }

    #[test]
    fn renders_af_packet_link_and_counters_per_port() {
        use crate::af_packet::{AfPacketSnapshot, LinkState};
        let port = |name: &str, af_packet| PortStats {
            name: name.into(),
            socket: "/s".into(),
            connected: false,
            started_ns: 0,
            acked_features: 0,
            sessions: Default::default(),
            queues: Vec::new(),
            af_packet,
            switch: None,
        };
        let snap = |interface: &str, link, base: u64| AfPacketSnapshot {
            interface: interface.into(),
            link,
            rx_truncated: base + 1,
            rx_gso_refused: base + 2,
            rx_too_big: base + 3,
            rx_malformed: base + 4,
            rx_csum_completed: base + 5,
            rx_ring_full: base + 6,
            tx_refused: base + 7,
            tx_link_down: base + 8,
            tx_stalled: base + 9,
            tx_failed: base + 10,
            reattached: base + 11,
            rx_copied: base + 12,
        };
        let text = render(
            &[
                port("vm0", Some(snap("veth0", LinkState::Up, 0))),
                port("tap0", None),
                port("vm1", Some(snap("we\"ird", LinkState::Gone, 100))),
            ],
            &[],
        );
        let afp: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.contains("vhost_pump_af_packet_"))
            .collect();
        let mut want = vec![
            "# HELP vhost_pump_af_packet_link_up 1 while the AF_PACKET port's interface is up, 0 while it is down or gone.".to_string(),
            "# TYPE vhost_pump_af_packet_link_up gauge".into(),
            "vhost_pump_af_packet_link_up{port=\"vm0\",interface=\"veth0\"} 1".into(),
            "vhost_pump_af_packet_link_up{port=\"vm1\",interface=\"we\\\"ird\"} 0".into(),
        ];
        for (i, name) in [
            "rx_truncated",
            "rx_gso_refused",
            "rx_too_big",
            "rx_malformed",
            "rx_csum_completed",
            "rx_ring_full",
            "tx_refused",
            "tx_link_down",
            "tx_stalled",
            "tx_failed",
            "reattached",
            "rx_copied",
        ]
        .into_iter()
        .enumerate()
        {
            let help = snap("x", LinkState::Up, 0).counters()[i].1;
            let family = format!("vhost_pump_af_packet_{name}_total");
            want.push(format!("# HELP {family} {help}"));
            want.push(format!("# TYPE {family} counter"));
            want.push(format!(
                "{family}{{port=\"vm0\",interface=\"veth0\"}} {}",
                i + 1
            ));
            want.push(format!(
                "{family}{{port=\"vm1\",interface=\"we\\\"ird\"}} {}",
                i + 101
            ));
        }
        assert_eq!(afp, want, "in\n{text}");
        // Spot checks written out in full.
        for line in [
            "# HELP vhost_pump_af_packet_rx_ring_full_total Frames the kernel dropped because the AF_PACKET RX ring was full.",
            "# TYPE vhost_pump_af_packet_rx_ring_full_total counter",
            "vhost_pump_af_packet_rx_ring_full_total{port=\"vm0\",interface=\"veth0\"} 6",
            "vhost_pump_af_packet_reattached_total{port=\"vm1\",interface=\"we\\\"ird\"} 111",
        ] {
            assert!(afp.contains(&line), "missing {line:?} in\n{text}");
        }
    }
}
