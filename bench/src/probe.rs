//! Blocking probes the suite runs against a gateway besides the load: one-shot HTTP
//! GETs (`/readyz`, the listing) and a single event-stream watcher that timestamps
//! every event it receives. Every call is bounded by a deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::sse::{Body, Head, Parser};

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("response body is not JSON")
    }
}

/// `GET path` on `addr` with `Connection: close`, reading the whole response within
/// `timeout`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<Response> {
    let end = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(timeout))?;
    // One write: the request in one segment.
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("GET {path}: no complete response within {timeout:?}");
        }
        s.set_read_timeout(Some(left))?;
        let k = match s.read(&mut chunk) {
            Ok(k) => k,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(e.into()),
        };
        if k > 0 {
            buf.extend_from_slice(&chunk[..k]);
        }
        if let Some(head) = Head::parse(&buf)? {
            let rest = &buf[head.len..];
            let done = match (head.chunked, head.content_length) {
                (true, _) => {
                    let mut body = Vec::new();
                    let mut d = Body::of(&head);
                    let more = d
                        .feed(rest, |b| body.extend_from_slice(b))
                        .map_err(|_| anyhow::anyhow!("GET {path}: malformed chunked body"))?;
                    (!more || k == 0).then_some(body)
                }
                (false, Some(n)) if rest.len() >= n => Some(rest[..n].to_vec()),
                _ if k == 0 => Some(rest.to_vec()),
                _ => None,
            };
            if let Some(body) = done {
                return Ok(Response {
                    status: head.status,
                    body,
                });
            }
        }
        if k == 0 {
            bail!("GET {path}: connection closed before a complete response");
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Polls `GET path` every `every` until it answers `status`; returns when it did
/// (measured when the answer arrived), or an error at `deadline`.
pub fn wait_status(
    addr: SocketAddr,
    path: &str,
    status: u16,
    every: Duration,
    deadline: Instant,
) -> anyhow::Result<(Instant, Response)> {
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match get(addr, path, left.min(Duration::from_secs(5))) {
            Ok(r) if r.status == status => return Ok((Instant::now(), r)),
            Ok(r) => last = format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(every);
    }
    let last: String = last.chars().take(400).collect();
    bail!("GET {path} did not answer {status} in time; last: {last}")
}

/// One received event.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Instant,
    pub event: String,
    pub data: String,
}

#[derive(Default)]
struct Seen {
    events: Vec<Event>,
    status: Option<u16>,
    ended: Option<String>,
}

/// A single event-stream client on its own thread, keeping every event with its
/// arrival time. It stops when dropped, when the stream ends, or at its deadline.
pub struct Watcher {
    seen: Arc<(Mutex<Seen>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Connects to `path` on `addr`, sending `headers` (`Name: value` lines), and
    /// reads until `deadline`.
    pub fn start(addr: SocketAddr, path: &str, headers: &[String], deadline: Instant) -> Self {
        let seen: Arc<(Mutex<Seen>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{}\r\n",
            headers
                .iter()
                .map(|h| format!("{h}\r\n"))
                .collect::<String>()
        );
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let why = match watch(addr, &req, deadline, &seen, &stop) {
                    Ok(()) => "closed".to_string(),
                    Err(e) => format!("{e:#}"),
                };
                let (m, cv) = &*seen;
                m.lock().unwrap().ended = Some(why);
                cv.notify_all();
            })
        };
        Self {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// The first event at or after index `from` that satisfies `pred`, waiting until
    /// `deadline`; with its index.
    pub fn wait_for(
        &self,
        from: usize,
        deadline: Instant,
        pred: impl Fn(&Event) -> bool,
    ) -> anyhow::Result<(usize, Event)> {
        let (m, cv) = &*self.seen;
        let mut g = m.lock().unwrap();
        loop {
            if let Some((i, e)) = g
                .events
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, e)| pred(e))
            {
                return Ok((i, e.clone()));
            }
            if let Some(why) = &g.ended {
                bail!("the stream ended ({why}) before the awaited event");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the awaited event did not arrive in time");
            }
            g = cv.wait_timeout(g, left).unwrap().0;
        }
    }

    /// How many events arrived so far.
    pub fn count(&self) -> usize {
        self.seen.0.lock().unwrap().events.len()
    }

    /// The response status, once the head arrived.
    pub fn status(&self) -> Option<u16> {
        self.seen.0.lock().unwrap().status
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(
    addr: SocketAddr,
    req: &str,
    deadline: Instant,
    seen: &(Mutex<Seen>, Condvar),
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut s = TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1)))?;
    s.set_nodelay(true)?;
    s.write_all(req.as_bytes())?;
    // Short reads so that a stop request is seen promptly.
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut body: Option<Body> = None;
    let mut parser = Parser::new();
    let (m, cv) = seen;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let k = match s.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(k) => k,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(e.into()),
        };
        let at = Instant::now();
        let input: Vec<u8> = match &mut body {
            Some(_) => chunk[..k].to_vec(),
            None => {
                buf.extend_from_slice(&chunk[..k]);
                let Some(head) = Head::parse(&buf)? else {
                    continue;
                };
                m.lock().unwrap().status = Some(head.status);
                cv.notify_all();
                if head.status != 200 {
                    bail!("status {}", head.status);
                }
                body = Some(Body::of(&head));
                buf[head.len..].to_vec()
            }
        };
        let mut events = Vec::new();
        let more = body
            .as_mut()
            .expect("set above")
            .feed(&input, |b| {
                parser.feed(b, |ev| {
                    events.push(Event {
                        at,
                        event: ev.event.to_string(),
                        data: String::from_utf8_lossy(ev.data).into_owned(),
                    })
                })
            })
            .map_err(|_| anyhow::anyhow!("malformed chunked body"))?;
        if !events.is_empty() {
            m.lock().unwrap().events.extend(events);
            cv.notify_all();
        }
        if !more {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves each accepted connection once with `answer`, then closes it.
    fn serve(answers: Vec<&'static str>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for a in answers {
                let (mut c, _) = l.accept().unwrap();
                let mut req = [0u8; 1024];
                let _ = c.read(&mut req);
                let _ = c.write_all(a.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn gets_content_length_chunked_and_close_delimited_bodies() {
        let addr = serve(vec![
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 15\r\n\r\n{\"ready\":false}xyz",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n",
            "HTTP/1.0 200 OK\r\n\r\nplain",
        ]);
        let t = Duration::from_secs(5);
        let r = get(addr, "/readyz", t).unwrap();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (503, &b"{\"ready\":false}"[..])
        );
        let r = get(addr, "/", t).unwrap();
        assert_eq!(r.json().unwrap()["a"], 1);
        let r = get(addr, "/", t).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"plain"[..]));
    }

    #[test]
    fn waits_for_a_status_and_gives_up_at_the_deadline() {
        let addr = serve(vec![
            "HTTP/1.1 503 x\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ]);
        let end = Instant::now() + Duration::from_secs(5);
        let (_, r) = wait_status(addr, "/readyz", 200, Duration::from_millis(5), end).unwrap();
        assert_eq!(r.body, b"ok");
        // Nothing listens any more: the deadline ends the wait.
        let end = Instant::now() + Duration::from_millis(200);
        assert!(wait_status(addr, "/readyz", 200, Duration::from_millis(5), end).is_err());
    }

    #[test]
    fn a_watcher_timestamps_events_and_sends_its_headers() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = vec![0u8; 1024];
            let n = c.read(&mut req).unwrap();
            let req = String::from_utf8_lossy(&req[..n]).to_string();
            c.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\nretry: 5\n\nevent: snapshot\ndata: {\"reason\":\"initial\"}\n\n").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            c.write_all(b"event: snapshot\ndata: {\"reason\":\"config-changed\"}\n\n")
                .unwrap();
            std::thread::sleep(Duration::from_millis(50));
            req
        });
        let end = Instant::now() + Duration::from_secs(5);
        let w = Watcher::start(addr, "/v/1", &["Authorization: Bearer t".into()], end);
        let (i, first) = w.wait_for(0, end, |e| e.event == "snapshot").unwrap();
        let (j, second) = w
            .wait_for(i + 1, end, |e| e.data.contains("config-changed"))
            .unwrap();
        assert_eq!((i, j), (0, 1));
        assert!(second.at >= first.at);
        assert_eq!(w.status(), Some(200));
        assert!(server
            .join()
            .unwrap()
            .contains("\r\nAuthorization: Bearer t\r\n"));
        // The server closed: waiting for more fails at once instead of at the deadline.
        let t0 = Instant::now();
        assert!(w.wait_for(2, end, |_| true).is_err());
        assert!(t0.elapsed() < Duration::from_secs(4));
        assert_eq!(w.count(), 2);
    }
}
