//! Loopback ports for the nodes of a cluster spawned on one machine (tests, `loadgen --spawn`,
//! `chaos`), where every node's address must be known before any node starts.
//!
//! A port the OS hands out for port 0 comes from the *ephemeral* range, the same range every
//! outgoing connection draws its local port from. Once such a port is released for a node to
//! take, a client reconnecting to some other node may take it first; and a killed node that
//! restarts on its old address finds it in use ("Address already in use": a test flake seen in
//! CI). So the ports come from below the ephemeral range, where no outgoing connection goes:
//! each is offered to the OS (bound, so one in use anywhere is skipped), each is handed out at
//! most once per process, and each process starts at its own place in the range.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Below this no port is handed out (well-known and registered services crowd there).
const FLOOR: u32 = 10_000;

/// The first port of the ephemeral range (Linux's default when it cannot be read).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// `n` distinct loopback ports, free when returned, outside the ephemeral range.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let top = ephemeral_start().min(u16::MAX as u32 + 1);
    let held = if top <= FLOOR + 1_000 {
        // The ephemeral range starts too low to leave room below it: fall back to the OS's
        // own choice (racy, as explained above, but nothing better is there).
        (0..n)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        let next = NEXT.get_or_init(|| {
            // Each process starts at its own place: two test binaries or loadgens rarely meet.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            AtomicU32::new((std::process::id().wrapping_mul(7_919) ^ nanos) % (top - FLOOR))
        });
        bind_from(next, top, n)?
    };
    // Released as they are returned, for the nodes to take.
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// `n` listeners on ports taken one after another from `next` on (an offset into
/// `FLOOR..top`), skipping those in use; held together, so the n are distinct even across a
/// wrap.
fn bind_from(next: &AtomicU32, top: u32, n: usize) -> std::io::Result<Vec<TcpListener>> {
    let span = top - FLOOR;
    let mut held = Vec::with_capacity(n);
    let mut tried = 0;
    while held.len() < n {
        if tried >= span {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("no free loopback port in {FLOOR}..{top}"),
            ));
        }
        tried += 1;
        let port = FLOOR + next.fetch_add(1, Ordering::Relaxed) % span;
        if let Ok(l) = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port as u16))) {
            held.push(l);
        }
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_below_the_ephemeral_range_and_free() {
        let a = free_ports(5).unwrap();
        let b = free_ports(5).unwrap();
        let mut all: Vec<u16> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 10, "handed out twice: {a:?} {b:?}");
        for p in &all {
            assert!((FLOOR..ephemeral_start()).contains(&(*p as u32)), "{p}");
            // Free: a node can take it.
            TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).unwrap();
        }
    }

    #[test]
    fn a_port_in_use_is_skipped() {
        let top = ephemeral_start();
        assert!(
            top > FLOOR + 1_000,
            "this machine's ephemeral range starts at {top}: free_ports falls back to port 0"
        );
        let taken = free_ports(1).unwrap()[0];
        let _hold = TcpListener::bind((Ipv4Addr::LOCALHOST, taken)).unwrap();
        // A cursor pointing right at the held port moves past it.
        let next = AtomicU32::new(taken as u32 - FLOOR);
        let got = bind_from(&next, top, 1).unwrap()[0]
            .local_addr()
            .unwrap()
            .port();
        assert_ne!(got, taken);
    }
}
