//! A WAN simulator for Tern's tests and benchmarks: Linux `tc netem` is not available on the
//! development machines, so wide-area links are simulated by a delaying TCP proxy.
//!
//! A [`Proxy`] listens on one address and forwards every connection to one target. Each
//! direction is a *delay line*: a chunk read at time `t` is written at `t + delay (± jitter)`,
//! in order, while later chunks keep being read, so a long link carries as much as a short one
//! (throughput is not serialised behind the delay). An optional bandwidth paces the writes. The
//! proxy counts the bytes it carries each way, and can be cut (a black hole: connections stay
//! open, nothing crosses) and healed (the connections that lost bytes are closed; new ones
//! work).
//!
//! A [`Mesh`] puts a proxy in front of every node for every other region: a node advertises
//! the proxy's address to that region (`tern serve --region-addresses`), so all traffic
//! between regions, node to node and client to node, crosses a delay line.

pub mod ports;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// One direction of a link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// One-way delay.
    pub delay: Duration,
    /// Each chunk's delay varies uniformly within `delay ± jitter` (never below zero), but a
    /// chunk never overtakes an earlier one: TCP keeps order.
    pub jitter: Duration,
    /// Bytes per second the direction carries (`None`: unlimited).
    pub bandwidth: Option<u64>,
}

impl Link {
    pub fn delay(delay: Duration) -> Link {
        Link {
            delay,
            ..Link::default()
        }
    }
}

/// Largest chunk read at once.
const CHUNK: usize = 64 << 10;
/// Chunks in flight per direction of a connection (at most 16 MiB): the reader waits beyond.
const IN_FLIGHT_CHUNKS: usize = 256;
/// Connections a proxy carries at once; further ones are closed on arrival.
pub const CONNECTIONS_MAX: u64 = 4096;

/// Bytes a proxy carried.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client to target.
    pub forward: AtomicU64,
    /// Target to client.
    pub backward: AtomicU64,
    /// Connections accepted in all.
    pub connections: AtomicU64,
    /// Connections open now.
    open: AtomicU64,
}

impl Counters {
    /// Bytes carried both ways.
    pub fn total(&self) -> u64 {
        self.forward.load(Ordering::Relaxed) + self.backward.load(Ordering::Relaxed)
    }
}

/// The state of a link: carrying, or cut (`epoch` counts cuts: a connection that lived through
/// one is closed when the link heals, since it lost bytes), and any delay added to both
/// directions' own (a fault: [`Proxy::add_delay`]).
#[derive(Clone, Copy, Debug, Default)]
struct Control {
    cut: bool,
    epoch: u64,
    extra: Duration,
}

/// A delaying TCP proxy in front of one target.
pub struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    counters: Arc<Counters>,
    control: watch::Sender<Control>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        // Open connections see the sender gone and close.
    }
}

impl Proxy {
    /// Listens on `listen` (port 0 takes one from the OS) and forwards to `target`, delaying
    /// each direction as its link says.
    pub async fn start(
        listen: SocketAddr,
        target: SocketAddr,
        forward: Link,
        backward: Link,
    ) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let (control, rx) = watch::channel(Control::default());
        let task = tokio::spawn(accept(
            listener,
            target,
            forward,
            backward,
            counters.clone(),
            rx,
        ));
        Ok(Proxy {
            addr,
            target,
            counters,
            control,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Cuts the link: nothing crosses until [`Proxy::heal`]; connections stay open (a peer
    /// finds out only by its own timeouts, as across a real partition).
    pub fn cut(&self) {
        self.control.send_modify(|c| {
            if !c.cut {
                c.cut = true;
                c.epoch += 1;
            }
        });
    }

    /// Restores the link. Connections that lived through the cut are closed.
    pub fn heal(&self) {
        self.control.send_modify(|c| c.cut = false);
    }

    pub fn is_cut(&self) -> bool {
        self.control.borrow().cut
    }

    /// Adds `extra` to both directions' one-way delay from now on (zero restores the links
    /// as started). Bytes already in flight keep their time, and order still holds: a chunk
    /// never overtakes an earlier one, so a shorter delay only takes effect behind them.
    pub fn add_delay(&self, extra: Duration) {
        self.control.send_modify(|c| c.extra = extra);
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    forward: Link,
    backward: Link,
    counters: Arc<Counters>,
    control: watch::Receiver<Control>,
) {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(target.port());
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors, say: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if counters.open.load(Ordering::Relaxed) >= CONNECTIONS_MAX {
            drop(client);
            continue;
        }
        counters.connections.fetch_add(1, Ordering::Relaxed);
        counters.open.fetch_add(1, Ordering::Relaxed);
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let counters = counters.clone();
        let control = control.clone();
        tokio::spawn(async move {
            connection(client, target, forward, backward, &counters, control, seed).await;
            counters.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Carries one connection until either side closes it or a cut it lived through heals.
async fn connection(
    client: TcpStream,
    target: SocketAddr,
    forward: Link,
    backward: Link,
    counters: &Counters,
    mut control: watch::Receiver<Control>,
    seed: u64,
) {
    let _ = client.set_nodelay(true);
    let start = *control.borrow_and_update();
    if start.cut {
        // Black hole: accept, carry nothing, close once healed.
        black_hole(client, &mut control).await;
        return;
    }
    let Ok(Ok(server)) =
        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(target)).await
    else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let epoch = start.epoch;
    let up = pipe(cr, sw, forward, &counters.forward, control.clone(), seed);
    let down = pipe(sr, cw, backward, &counters.backward, control.clone(), !seed);
    let lost = async {
        // Ends once a cut this connection lived through has healed.
        loop {
            let c = *control.borrow_and_update();
            if c.epoch != epoch && !c.cut {
                return;
            }
            if control.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = lost => {}
    }
}

async fn black_hole(mut client: TcpStream, control: &mut watch::Receiver<Control>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            r = client.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
            c = control.changed() => {
                if c.is_err() || !control.borrow().cut {
                    return;
                }
            }
        }
    }
}

/// One direction: a reader stamps each chunk with its release time and a writer releases them
/// in order, so the delay adds latency, not a limit on throughput. Bytes read while the link
/// is cut are dropped.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    link: Link,
    count: &AtomicU64,
    control: watch::Receiver<Control>,
    seed: u64,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT_CHUNKS);
    let reader = async move {
        let mut rng = SplitMix(seed);
        let mut last = Instant::now();
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let (cut, extra) = {
                let c = control.borrow();
                (c.cut, c.extra)
            };
            if cut {
                continue;
            }
            buf.truncate(n);
            let delay = jittered(link, &mut rng) + extra;
            // Never before an earlier chunk: order holds.
            let at = (Instant::now() + delay).max(last);
            last = at;
            if tx.send((at, buf)).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        let mut free_at = Instant::now();
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if let Some(bw) = link.bandwidth.filter(|b| *b > 0) {
                let now = Instant::now();
                free_at = free_at.max(now);
                tokio::time::sleep_until(free_at).await;
                free_at += Duration::from_secs_f64(buf.len() as f64 / bw as f64);
            }
            if to.write_all(&buf).await.is_err() {
                break;
            }
            count.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

fn jittered(link: Link, rng: &mut SplitMix) -> Duration {
    if link.jitter.is_zero() {
        return link.delay;
    }
    let j = link.jitter.as_nanos() as f64;
    let offset = (rng.unit() * 2.0 - 1.0) * j;
    let d = link.delay.as_nanos() as f64 + offset;
    Duration::from_nanos(d.max(0.0) as u64)
}

/// A small deterministic generator for jitter (not for anything secret).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A node of a simulated geo cluster: its region and the address it listens on.
#[derive(Clone, Debug)]
pub struct Site {
    pub region: String,
    pub addr: SocketAddr,
}

/// Proxies between regions: for every node and every other region, a proxy that the other
/// region's nodes and clients use to reach the node.
pub struct Mesh {
    /// (from region, node index) → the proxy in front of that node for that region.
    proxies: BTreeMap<(String, usize), Proxy>,
    sites: Vec<Site>,
}

impl Mesh {
    /// Starts the proxies on loopback. `one_way(a, b)` is the link from region `a` to region
    /// `b`; the way back uses `one_way(b, a)`.
    pub async fn start(
        sites: &[Site],
        one_way: impl Fn(&str, &str) -> Link,
    ) -> std::io::Result<Mesh> {
        let regions: std::collections::BTreeSet<&str> =
            sites.iter().map(|s| s.region.as_str()).collect();
        let mut proxies = BTreeMap::new();
        for (i, site) in sites.iter().enumerate() {
            for from in regions.iter().filter(|r| **r != site.region) {
                let p = Proxy::start(
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                    site.addr,
                    one_way(from, &site.region),
                    one_way(&site.region, from),
                )
                .await?;
                proxies.insert((from.to_string(), i), p);
            }
        }
        Ok(Mesh {
            proxies,
            sites: sites.to_vec(),
        })
    }

    /// A mesh where every pair of regions is `rtt` apart (half each way).
    pub async fn uniform(sites: &[Site], rtt: Duration) -> std::io::Result<Mesh> {
        Mesh::start(sites, |_, _| Link::delay(rtt / 2)).await
    }

    /// The address a node or client in `from` uses to reach node `i`: the node itself within
    /// its region, its proxy for `from` otherwise.
    pub fn addr(&self, from: &str, i: usize) -> SocketAddr {
        match self.proxies.get(&(from.to_string(), i)) {
            Some(p) => p.addr(),
            None => self.sites[i].addr,
        }
    }

    /// Node `i`'s `--region-addresses` value: `REGION=HOST:PORT,...`.
    pub fn region_addresses(&self, i: usize) -> String {
        self.proxies
            .iter()
            .filter(|((_, n), _)| *n == i)
            .map(|((r, _), p)| format!("{r}={}", p.addr()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Bytes that crossed between regions, all links together.
    pub fn wan_bytes(&self) -> u64 {
        self.proxies.values().map(|p| p.counters().total()).sum()
    }

    /// Bytes that crossed into and out of node `i` from region `from`.
    pub fn bytes_between(&self, from: &str, i: usize) -> u64 {
        self.proxies
            .get(&(from.to_string(), i))
            .map_or(0, |p| p.counters().total())
    }

    /// Cuts `region` off from every other region, both ways (its nodes keep talking among
    /// themselves).
    pub fn cut_region(&self, region: &str) {
        self.for_region(region, Proxy::cut);
    }

    pub fn heal_region(&self, region: &str) {
        self.for_region(region, Proxy::heal);
    }

    /// Adds `extra` one-way delay to every link into and out of `region` (zero removes it).
    pub fn delay_region(&self, region: &str, extra: Duration) {
        self.for_region(region, |p| p.add_delay(extra));
    }

    fn for_region(&self, region: &str, f: impl Fn(&Proxy)) {
        for ((from, i), p) in &self.proxies {
            if from == region || self.sites[*i].region == region {
                f(p);
            }
        }
    }

    pub fn sites(&self) -> &[Site] {
        &self.sites
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// A proxy in front of `target` that adds nothing of its own.
    async fn plain(target: SocketAddr) -> Proxy {
        Proxy::start(
            "127.0.0.1:0".parse().unwrap(),
            target,
            Link::default(),
            Link::default(),
        )
        .await
        .unwrap()
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
        let t = std::time::Instant::now();
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
        t.elapsed()
    }

    #[tokio::test]
    async fn delays_each_way_and_counts_bytes() {
        let target = echo().await;
        let p = Proxy::start(
            "127.0.0.1:0".parse().unwrap(),
            target,
            Link::delay(Duration::from_millis(30)),
            Link::delay(Duration::from_millis(20)),
        )
        .await
        .unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        let rtt = round_trip(&mut s, b"hello").await;
        assert!(rtt >= Duration::from_millis(50), "{rtt:?}");
        assert_eq!(p.counters().forward.load(Ordering::Relaxed), 5);
        assert_eq!(p.counters().backward.load(Ordering::Relaxed), 5);
        assert_eq!(p.counters().connections.load(Ordering::Relaxed), 1);
    }

    /// A delay added as a fault holds on connections already open, both ways, and bytes
    /// still arrive whole and in order once it is taken away.
    #[tokio::test]
    async fn an_added_delay_holds_on_open_connections_until_removed() {
        let target = echo().await;
        let p = plain(target).await;
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        round_trip(&mut s, b"before").await;
        p.add_delay(Duration::from_millis(100));
        let rtt = round_trip(&mut s, b"delayed").await;
        assert!(rtt >= Duration::from_millis(200), "{rtt:?}");
        p.add_delay(Duration::ZERO);
        for i in 0..20u8 {
            round_trip(&mut s, &[i; 100]).await;
        }
        assert_eq!(p.counters().forward.load(Ordering::Relaxed), 6 + 7 + 2000);
    }

    /// A delay line: many chunks sent back to back arrive after about one delay, not one delay
    /// each, and in order even with jitter.
    #[tokio::test]
    async fn pipelines_and_keeps_order_under_jitter() {
        let target = echo().await;
        let link = Link {
            delay: Duration::from_millis(40),
            jitter: Duration::from_millis(30),
            bandwidth: None,
        };
        let p = Proxy::start("127.0.0.1:0".parse().unwrap(), target, link, link)
            .await
            .unwrap();
        let s = TcpStream::connect(p.addr()).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let n: u32 = 200;
        let t = std::time::Instant::now();
        let writer = tokio::spawn(async move {
            for i in 0..n {
                w.write_all(&i.to_be_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            w
        });
        for i in 0..n {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).await.unwrap();
            assert_eq!(u32::from_be_bytes(b), i, "out of order");
        }
        let _w = writer.await.unwrap();
        // 200 sends 1 ms apart plus about one round trip (80 ms ± 60): far below 200 × 80 ms.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn bandwidth_paces_the_writes() {
        let target = echo().await;
        let link = Link {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            bandwidth: Some(1 << 20),
        };
        let p = Proxy::start(
            "127.0.0.1:0".parse().unwrap(),
            target,
            link,
            Link::default(),
        )
        .await
        .unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        // 512 KiB at 1 MiB/s takes at least about half a second.
        let rtt = round_trip(&mut s, &vec![7u8; 512 << 10]).await;
        assert!(rtt >= Duration::from_millis(400), "{rtt:?}");
    }

    #[tokio::test]
    async fn a_cut_carries_nothing_and_a_heal_closes_what_lived_through_it() {
        let target = echo().await;
        let p = plain(target).await;
        let mut old = TcpStream::connect(p.addr()).await.unwrap();
        round_trip(&mut old, b"before").await;
        p.cut();
        old.write_all(b"lost").await.unwrap();
        let mut during = TcpStream::connect(p.addr()).await.unwrap();
        during.write_all(b"lost too").await.unwrap();
        let mut b = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_millis(300), old.read(&mut b)).await;
        assert!(r.is_err(), "nothing crosses a cut: {r:?}");
        let carried = p.counters().total();
        p.heal();
        // Both connections lost bytes: they are closed.
        for s in [&mut old, &mut during] {
            let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .expect("closed after the heal");
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        }
        assert_eq!(p.counters().total(), carried);
        let mut new = TcpStream::connect(p.addr()).await.unwrap();
        round_trip(&mut new, b"after").await;
    }

    #[tokio::test]
    async fn a_mesh_routes_other_regions_through_proxies() {
        let a = echo().await;
        let b = echo().await;
        let sites = [
            Site {
                region: "a".into(),
                addr: a,
            },
            Site {
                region: "b".into(),
                addr: b,
            },
        ];
        let m = Mesh::uniform(&sites, Duration::from_millis(40))
            .await
            .unwrap();
        assert_eq!(m.addr("a", 0), a, "in-region: direct");
        assert_ne!(m.addr("a", 1), b);
        assert_eq!(m.region_addresses(1), format!("a={}", m.addr("a", 1)));
        let mut s = TcpStream::connect(m.addr("a", 1)).await.unwrap();
        assert!(round_trip(&mut s, b"x").await >= Duration::from_millis(40));
        assert_eq!(m.wan_bytes(), 2);
        assert_eq!(m.bytes_between("a", 1), 2);
        m.cut_region("b");
        let mut b2 = [0u8; 1];
        s.write_all(b"y").await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(200), s.read(&mut b2)).await;
        assert!(r.is_err());
    }
}
