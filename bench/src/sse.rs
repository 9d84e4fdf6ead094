//! The load client's wire decoding: the response head (parsed by `httparse`), an
//! incremental HTTP/1.1 chunked-body decoder, and an incremental `text/event-stream`
//! parser that follows the WHATWG rules (CR, LF and CRLF line ends, a leading BOM,
//! `data` lines joined with LF, `id` with NUL ignored, numeric `retry`, comments,
//! dispatch on a blank line, no dispatch without data).
//!
//! The body decoders work on borrowed chunks and call back per event, so the per-event
//! path allocates nothing once the buffers have grown.

/// One dispatched event, borrowed from the parser's buffers.
#[derive(Debug, PartialEq, Eq)]
pub struct EventRef<'a> {
    /// The `event:` field, or `message` when none was given.
    pub event: &'a str,
    /// The `data:` lines joined with LF.
    pub data: &'a [u8],
    /// The last event id seen on this stream (it persists across events).
    pub id: &'a [u8],
}

/// What the parser reports besides events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub comments: u64,
    pub retry: Option<u64>,
}

/// Incremental event-stream parser.
#[derive(Debug, Default)]
pub struct Parser {
    line: Vec<u8>,
    /// The previous chunk ended in CR: a following LF belongs to that line end.
    after_cr: bool,
    started: bool,
    event: String,
    data: Vec<u8>,
    has_data: bool,
    id: Vec<u8>,
    pub counters: Counters,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk of the body; `on_event` runs for each dispatched event.
    pub fn feed(&mut self, mut chunk: &[u8], mut on_event: impl FnMut(EventRef<'_>)) {
        if !self.started && !chunk.is_empty() {
            // A BOM may straddle chunks in theory; the servers here never send one.
            if chunk.starts_with(b"\xEF\xBB\xBF") {
                chunk = &chunk[3..];
            }
            self.started = true;
        }
        if self.after_cr && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        self.after_cr = false;
        while let Some(pos) = memchr::memchr2(b'\n', b'\r', chunk) {
            let end = chunk[pos];
            if self.line.is_empty() {
                self.process_line(&chunk[..pos], &mut on_event);
            } else {
                self.line.extend_from_slice(&chunk[..pos]);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, &mut on_event);
                self.line = line;
                self.line.clear();
            }
            chunk = &chunk[pos + 1..];
            if end == b'\r' {
                if chunk.first() == Some(&b'\n') {
                    chunk = &chunk[1..];
                } else if chunk.is_empty() {
                    self.after_cr = true;
                }
            }
        }
        self.line.extend_from_slice(chunk);
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(EventRef<'_>)) {
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            self.counters.comments += 1;
            return;
        }
        let (name, mut value) = match memchr::memchr(b':', line) {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &b""[..]),
        };
        if value.first() == Some(&b' ') {
            value = &value[1..];
        }
        match name {
            b"event" => {
                self.event.clear();
                self.event.push_str(&String::from_utf8_lossy(value));
            }
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"id" if !value.contains(&0) => {
                self.id.clear();
                self.id.extend_from_slice(value);
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                self.counters.retry = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(EventRef<'_>)) {
        if self.has_data {
            let event = if self.event.is_empty() {
                "message"
            } else {
                &self.event
            };
            on_event(EventRef {
                event,
                data: &self.data,
                id: &self.id,
            });
        }
        self.data.clear();
        self.has_data = false;
        self.event.clear();
    }
}

/// Incremental decoder of an HTTP/1.1 `Transfer-Encoding: chunked` body.
#[derive(Debug, Default)]
pub struct Dechunker {
    state: ChunkState,
    size: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Chunk extensions up to the LF of the size line.
    SizeRest,
    Data,
    DataCr,
    DataLf,
    /// The last (zero-size) chunk has been read. Trailers are not used by any server
    /// here, so the body ends there.
    Done,
}

/// A malformed chunked body.
#[derive(Debug, PartialEq, Eq)]
pub struct ChunkError;

impl Dechunker {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the last (zero-size) chunk has been read.
    pub fn finished(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, passing each run of body bytes to `out`.
    pub fn feed(&mut self, mut input: &[u8], mut out: impl FnMut(&[u8])) -> Result<(), ChunkError> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Size => {
                    let b = input[0];
                    input = &input[1..];
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            let digit = (b as char).to_digit(16).ok_or(ChunkError)? as u64;
                            self.size = self.size.checked_mul(16).ok_or(ChunkError)? + digit;
                        }
                        b'\r' | b';' | b' ' | b'\t' => self.state = ChunkState::SizeRest,
                        b'\n' => self.end_size_line(),
                        _ => return Err(ChunkError),
                    }
                }
                ChunkState::SizeRest => match input.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        input = &input[i + 1..];
                        self.end_size_line();
                    }
                    None => input = &[],
                },
                ChunkState::Data => {
                    let n = (self.size as usize).min(input.len());
                    out(&input[..n]);
                    input = &input[n..];
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                }
                ChunkState::DataCr => {
                    self.state = match input[0] {
                        b'\r' => ChunkState::DataLf,
                        b'\n' => ChunkState::Size,
                        _ => return Err(ChunkError),
                    };
                    input = &input[1..];
                }
                ChunkState::DataLf => {
                    if input[0] != b'\n' {
                        return Err(ChunkError);
                    }
                    input = &input[1..];
                    self.state = ChunkState::Size;
                }
                ChunkState::Done => break,
            }
        }
        Ok(())
    }

    fn end_size_line(&mut self) {
        self.state = if self.size == 0 {
            ChunkState::Done
        } else {
            ChunkState::Data
        };
    }
}

/// How a response body is framed, from its head: chunked (`transfer-encoding` whose
/// last coding is `chunked`) or close-delimited (no transfer-encoding; the body runs
/// until the server closes, as tailgate's fast path and HTTP/1.0 servers send it).
#[derive(Debug)]
pub enum Body {
    Chunked(Dechunker),
    Close,
}

/// A complete HTTP/1.x response head.
#[derive(Debug)]
pub struct Head {
    pub status: u16,
    pub reason: String,
    /// Bytes the head takes; the body starts there.
    pub len: usize,
    /// `transfer-encoding` whose last coding is `chunked`.
    pub chunked: bool,
    pub content_length: Option<usize>,
}

impl Head {
    /// Parses the head at the start of `buf`: Ok(None) while it is incomplete.
    pub fn parse(buf: &[u8]) -> Result<Option<Head>, httparse::Error> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(len) = response.parse(buf)? else {
            return Ok(None);
        };
        let value = |name: &'static str| {
            response
                .headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value))
        };
        let chunked = value("transfer-encoding").any(|v| {
            v.rsplit(',')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
        });
        let content_length = value("content-length").find_map(|v| v.trim().parse().ok());
        Ok(Some(Head {
            status: response.code.unwrap_or(0),
            reason: response.reason.unwrap_or("").to_string(),
            len,
            chunked,
            content_length,
        }))
    }
}

impl Body {
    /// The framing of a response body: chunked or close-delimited.
    pub fn of(head: &Head) -> Self {
        if head.chunked {
            Body::Chunked(Dechunker::new())
        } else {
            Body::Close
        }
    }

    /// Decodes `input`, passing body bytes to `out`. Ok(false) once a chunked body has
    /// ended (a close-delimited one ends only when the socket does).
    pub fn feed(&mut self, input: &[u8], mut out: impl FnMut(&[u8])) -> Result<bool, ChunkError> {
        match self {
            Body::Chunked(d) => {
                d.feed(input, out)?;
                Ok(!d.finished())
            }
            Body::Close => {
                if !input.is_empty() {
                    out(input);
                }
                Ok(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Owned = (String, String, String);

    /// (event, data, id) of a dispatched event.
    fn owned(e: EventRef<'_>) -> Owned {
        (
            e.event.to_string(),
            String::from_utf8_lossy(e.data).into_owned(),
            String::from_utf8_lossy(e.id).into_owned(),
        )
    }

    fn collect(p: &mut Parser, chunks: &[&[u8]]) -> Vec<Owned> {
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |e| out.push(owned(e)));
        }
        out
    }

    #[test]
    fn parses_the_wire_contract() {
        let mut p = Parser::new();
        let body = b"retry: 15000\n\nevent: snapshot\nid: 5\ndata: {\"a\":1}\n\n: keepalive\n\nevent: tick\nid: 6\ndata: {\"b\":2}\n\n";
        let got = collect(&mut p, &[body]);
        assert_eq!(
            got,
            vec![
                ("snapshot".into(), "{\"a\":1}".into(), "5".into()),
                ("tick".into(), "{\"b\":2}".into(), "6".into()),
            ]
        );
        assert_eq!(p.counters.retry, Some(15000));
        assert_eq!(p.counters.comments, 1);
    }

    #[test]
    fn every_split_point_and_line_ending_gives_the_same_events() {
        let bodies: [&[u8]; 3] = [
            b"event: e\ndata: x\ndata: y\n\ndata: z\n\n",
            b"event: e\r\ndata: x\r\ndata: y\r\n\r\ndata: z\r\n\r\n",
            b"event: e\rdata: x\rdata: y\r\rdata: z\r\r",
        ];
        let want = vec![
            ("e".to_string(), "x\ny".to_string(), String::new()),
            ("message".to_string(), "z".to_string(), String::new()),
        ];
        for body in bodies {
            for split in 0..=body.len() {
                let mut p = Parser::new();
                let got = collect(&mut p, &[&body[..split], &body[split..]]);
                assert_eq!(
                    got,
                    want,
                    "split at {split} of {:?}",
                    String::from_utf8_lossy(body)
                );
            }
            // One byte at a time.
            let mut p = Parser::new();
            let chunks: Vec<&[u8]> = body.chunks(1).collect();
            assert_eq!(collect(&mut p, &chunks), want);
        }
    }

    #[test]
    fn spec_corner_cases() {
        let mut p = Parser::new();
        // BOM, no space after the colon, a field without a colon, an id with NUL
        // (ignored), a non-numeric retry (ignored), an event without data (not
        // dispatched, and its type does not leak into the next event).
        let body = b"\xEF\xBB\xBFdata:a\nid: 7\n\nid: bad\0id\ndata\n\nretry: 1x\nevent: lost\n\ndata: b\n\n";
        let got = collect(&mut p, &[body]);
        assert_eq!(
            got,
            vec![
                ("message".into(), "a".into(), "7".into()),
                ("message".into(), "".into(), "7".into()),
                ("message".into(), "b".into(), "7".into()),
            ]
        );
        assert_eq!(p.counters.retry, None);
    }

    #[test]
    fn dechunks_across_any_split() {
        let body = b"7\r\nevent: \r\n6;ext=1\r\nhello\n\r\na\r\n0123456789\r\n0\r\n\r\n";
        for split in 0..=body.len() {
            let mut d = Dechunker::new();
            let mut out = Vec::new();
            d.feed(&body[..split], |b| out.extend_from_slice(b))
                .unwrap();
            d.feed(&body[split..], |b| out.extend_from_slice(b))
                .unwrap();
            assert_eq!(out, b"event: hello\n0123456789");
            assert!(d.finished());
        }
    }

    #[test]
    fn rejects_a_bad_chunk_size() {
        let mut d = Dechunker::new();
        assert_eq!(d.feed(b"zz\r\n", |_| {}), Err(ChunkError));
    }

    fn parsed(head: &[u8]) -> Head {
        Head::parse(head).unwrap().expect("a complete head")
    }

    #[test]
    fn parses_a_response_head_split_anywhere() {
        let raw = b"HTTP/1.0 404 Not Found\r\nContent-Length: 12\r\nTransfer-Encoding: gzip, chunked\r\n\r\nbody";
        let body_start = raw.len() - 4;
        for end in 0..body_start {
            assert!(
                Head::parse(&raw[..end]).unwrap().is_none(),
                "complete at {end}"
            );
        }
        let head = parsed(raw);
        assert_eq!(
            (head.status, head.reason.as_str(), head.len),
            (404, "Not Found", body_start)
        );
        assert_eq!((head.chunked, head.content_length), (true, Some(12)));
        assert!(Head::parse(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    fn events_through(head: &[u8], body: &[u8], split: usize) -> (Vec<Owned>, bool) {
        let mut framing = Body::of(&parsed(head));
        let mut p = Parser::new();
        let mut out = Vec::new();
        let mut more = true;
        for part in [&body[..split], &body[split..]] {
            more = framing
                .feed(part, |b| p.feed(b, |e| out.push(owned(e))))
                .unwrap();
        }
        (out, more)
    }

    #[test]
    fn close_delimited_and_chunked_bodies_give_the_same_events() {
        // tailgate's fast path: no transfer-encoding, `connection: close`, the body
        // runs until the socket closes.
        let close_head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nx-accel-buffering: no\r\nconnection: close\r\n\r\n";
        let chunked_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        let raw: &[u8] = b"retry: 15000\n\nevent: snapshot\nid: 5\ndata: {\"seq\":1}\n\nevent: tick\nid: 6\ndata: {\"seq\":2}\n\n";
        let mut chunked = Vec::new();
        for part in raw.chunks(17) {
            chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        assert!(matches!(Body::of(&parsed(close_head)), Body::Close));
        assert!(matches!(Body::of(&parsed(chunked_head)), Body::Chunked(_)));
        // A head that merely mentions "chunked" elsewhere is not chunked.
        assert!(matches!(
            Body::of(&parsed(b"HTTP/1.1 200 OK\r\nx-note: chunked\r\n\r\n")),
            Body::Close
        ));
        let want = vec![
            (
                "snapshot".to_string(),
                "{\"seq\":1}".to_string(),
                "5".to_string(),
            ),
            (
                "tick".to_string(),
                "{\"seq\":2}".to_string(),
                "6".to_string(),
            ),
        ];
        for split in 0..=raw.len() {
            let (got, more) = events_through(close_head, raw, split);
            assert_eq!(got, want, "close-delimited, split at {split}");
            assert!(more, "a close-delimited body ends only with the socket");
        }
        for split in 0..=chunked.len() {
            let (got, more) = events_through(chunked_head, &chunked, split);
            assert_eq!(got, want, "chunked, split at {split}");
            assert!(more);
        }
        // The last chunk ends a chunked body.
        let mut ended = chunked.clone();
        ended.extend_from_slice(b"0\r\n\r\n");
        let (got, more) = events_through(chunked_head, &ended, ended.len());
        assert_eq!(got, want);
        assert!(!more);
    }
}
