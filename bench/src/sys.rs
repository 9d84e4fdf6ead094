//! Operating-system facts the suite needs: clocks, `/proc` samples of a process,
//! and client sockets bound to rotating loopback source addresses.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// CPU time and memory of one process at one instant.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct ProcSample {
    /// utime + stime in seconds.
    pub cpu_s: f64,
    pub rss_kb: u64,
    pub fds: u64,
    /// Wall clock of the sample, epoch µs.
    pub at_us: u64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Samples `/proc/<pid>` (or the caller with `None`). Errors if the process is gone.
pub fn sample(pid: Option<u32>) -> io::Result<ProcSample> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}"),
        None => "/proc/self".to_string(),
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    let cpu_s = (ticks(11) + ticks(12)) as f64 / clock_ticks();
    let status = std::fs::read_to_string(format!("{dir}/status"))?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("{dir}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Ok(ProcSample {
        cpu_s,
        rss_kb,
        fds,
        at_us: now_us(),
    })
}

/// CPU used between two samples, as a fraction of one core.
pub fn cpu_share(a: &ProcSample, b: &ProcSample) -> f64 {
    let wall = (b.at_us.saturating_sub(a.at_us)) as f64 / 1e6;
    if wall <= 0.0 {
        0.0
    } else {
        (b.cpu_s - a.cpu_s) / wall
    }
}

/// The source address of client `i`: 127.`net`.x.y with y in 2..=251, so each address
/// carries at most 250 connections and `net` rotates between runs (TIME_WAIT).
pub fn source_addr(net: u8, i: usize) -> Ipv4Addr {
    let x = (i / 250) as u8;
    let y = (i % 250) as u8 + 2;
    Ipv4Addr::new(127, net.max(1), x, y)
}

/// A non-blocking TCP socket bound to `src` with `IP_BIND_ADDRESS_NO_PORT`, so the
/// port is chosen per 4-tuple at `connect()` instead of at `bind()`.
pub fn bound_socket(src: Ipv4Addr) -> io::Result<tokio::net::TcpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let one: libc::c_int = 1;
    // SAFETY: a valid fd, a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    Ok(tokio::net::TcpSocket::from_std_stream(s.into()))
}

/// Total kernel slab memory, in kB.
pub fn slab_kb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Slab:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The fields of `/proc/<pid>/smaps_rollup` in kB (`Rss`, `Pss`, `Anonymous`,
/// `Private_Dirty`, ...), plus `Threads` from `/proc/<pid>/status`.
pub fn memory_breakdown(pid: u32) -> io::Result<std::collections::BTreeMap<String, u64>> {
    let mut out = parse_kb_fields(&std::fs::read_to_string(format!(
        "/proc/{pid}/smaps_rollup"
    ))?);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    if let Some(t) = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
    {
        out.insert("Threads".into(), t);
    }
    Ok(out)
}

/// `Name:   123 kB` lines into a map; other lines are skipped.
fn parse_kb_fields(text: &str) -> std::collections::BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let mut parts = rest.split_whitespace();
            let v = parts.next()?.parse().ok()?;
            (parts.next() == Some("kB")).then(|| (name.trim().to_string(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_rotate_and_never_hit_the_server() {
        assert_eq!(source_addr(3, 0), Ipv4Addr::new(127, 3, 0, 2));
        assert_eq!(source_addr(3, 249), Ipv4Addr::new(127, 3, 0, 251));
        assert_eq!(source_addr(3, 250), Ipv4Addr::new(127, 3, 1, 2));
        assert_eq!(source_addr(0, 18_999), Ipv4Addr::new(127, 1, 75, 251));
    }

    #[test]
    fn samples_this_process() {
        let a = sample(None).unwrap();
        assert!(a.rss_kb > 0 && a.fds > 0 && a.at_us > 0);
        assert!(sample(Some(u32::MAX)).is_err());
    }

    #[test]
    fn memory_breakdown_reads_smaps_rollup() {
        let m = parse_kb_fields(
            "5599e000-7ffd0000 ---p 00000000 00:00 0  [rollup]\nRss:  1200 kB\nAnonymous:   800 kB\nTHPeligible: 0\n",
        );
        assert_eq!(m.get("Rss"), Some(&1200));
        assert_eq!(m.get("Anonymous"), Some(&800));
        assert_eq!(m.len(), 2);
        let me = memory_breakdown(std::process::id()).unwrap();
        assert!(me["Rss"] > 0 && me["Threads"] >= 1);
    }

    #[test]
    fn cpu_share_is_cpu_time_over_wall_time() {
        let at = |cpu_s: f64, at_us: u64| ProcSample {
            cpu_s,
            at_us,
            ..ProcSample::default()
        };
        assert_eq!(cpu_share(&at(1.0, 1_000_000), &at(1.5, 3_000_000)), 0.25);
        // No wall time passed (or the clock stepped back): no share.
        assert_eq!(cpu_share(&at(1.0, 5), &at(2.0, 5)), 0.0);
        assert_eq!(cpu_share(&at(1.0, 9), &at(2.0, 5)), 0.0);
    }
}
