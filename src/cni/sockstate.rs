//! Whether a Unix socket path is being listened on, and whether a peer is connected to it,
//! read from `/proc/net/unix` without connecting. CHECK must not connect: a connection is a
//! vhost-user session to the backend, and a socket file alone says nothing about who serves
//! it. The table lists every socket of the reader's network namespace (the plugin and the
//! backends it starts share the host's); sockets a listener accepted carry its path too.

use std::path::Path;

/// `__SO_ACCEPTCON` in the Flags column: the socket listens.
const ACCEPTCON: u32 = 0x0001_0000;
/// `SS_CONNECTED` in the St column.
const CONNECTED: u32 = 3;

/// What the table says about one path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketState {
    /// A socket bound to the path listens.
    pub listening: bool,
    /// Connections accepted on it are open.
    pub connections: usize,
}

/// Reads `/proc/net/unix` for `path`.
pub fn of(path: &Path) -> SocketState {
    std::fs::read_to_string("/proc/net/unix")
        .map(|t| parse(&t, path))
        .unwrap_or_default()
}

/// Parses a `/proc/net/unix` table for `path`.
pub fn parse(table: &str, path: &Path) -> SocketState {
    let want = path.to_string_lossy();
    let mut st = SocketState::default();
    // Num RefCount Protocol Flags Type St Inode Path
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[7..].join(" ") != want {
            continue;
        }
        let flags = u32::from_str_radix(f[3], 16).unwrap_or(0);
        let state = u32::from_str_radix(f[5], 16).unwrap_or(0);
        if flags & ACCEPTCON != 0 {
            st.listening = true;
        } else if state == CONNECTED {
            st.connections += 1;
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_and_connected_sockets_are_told_apart() {
        let table = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 27181 /tmp/vhostuser_10.0.0.5/vhu.sock
0000000000000000: 00000003 00000000 00000000 0001 03 27190 /tmp/vhostuser_10.0.0.5/vhu.sock
0000000000000000: 00000003 00000000 00000000 0001 03 27191
0000000000000000: 00000002 00000000 00010000 0001 01 27100 /tmp/vhostuser_10.0.0.50/vhu.sock
";
        assert_eq!(
            parse(table, Path::new("/tmp/vhostuser_10.0.0.5/vhu.sock")),
            SocketState {
                listening: true,
                connections: 1
            }
        );
        assert_eq!(
            parse(table, Path::new("/tmp/vhostuser_10.0.0.6/vhu.sock")),
            SocketState::default()
        );
    }

    #[test]
    fn our_own_listener_shows_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert!(of(&p).listening);
        let _c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        let _a = l.accept().unwrap();
        assert_eq!(of(&p).connections, 1);
    }
}
