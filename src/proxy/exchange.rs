//! The HTTP/1.1 upgrade exchange with a ws app, written here rather than through hyper's
//! client: the request head in one write, the answer's head parsed with httparse. hyper's
//! client would spawn a connection task per session and hand the upgraded socket back through
//! channels; this is the hot path of every proxied session, so it is plain code on the
//! session's own task. A refusal's body is read whole (at most [`MAX_REFUSAL_BODY`]) to be
//! passed to the client.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::stream::{Io, ReadAhead};

/// Largest answer head taken from an app (status line and headers).
pub(crate) const MAX_HEAD: usize = 16 * 1024;

/// Most headers an answer head may have.
const MAX_HEADERS: usize = 100;

/// Largest refusal body passed on to the client; a longer one is a failed exchange.
pub(crate) const MAX_REFUSAL_BODY: usize = 1 << 20;

/// Why the exchange failed (the log's detail; the client gets a fixed text).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the app closed the connection before its answer was complete")]
    Eof,
    #[error("the app's answer head is malformed: {0}")]
    Malformed(&'static str),
    #[error("the app's answer head is over 16 KiB")]
    HeadTooLarge,
    #[error("the app's refusal body is over 1 MiB")]
    BodyTooLarge,
}

/// An app's answer head: its status and headers, and the bytes read after it.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub rest: BytesMut,
}

/// The request head as HTTP/1.1 writes it: the request line, then each header as given.
pub(crate) fn encode_head<B>(request: &Request<B>) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(request.method().as_str().as_bytes());
    head.push(b' ');
    let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in request.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Reads the app's answer head (the request went out with the connection).
pub(crate) async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> Result<Answer, ExchangeError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Err(ExchangeError::Eof);
        }
        while let Some(answer) = parse_head(&mut buf)? {
            // An interim answer (100 Continue, 103 Early Hints) is not the app's word on the
            // upgrade: the next head is.
            if answer.status.is_informational() && answer.status != StatusCode::SWITCHING_PROTOCOLS
            {
                buf = answer.rest;
                continue;
            }
            return Ok(answer);
        }
        if buf.len() > MAX_HEAD {
            return Err(ExchangeError::HeadTooLarge);
        }
    }
}

/// The answer head at the start of `buf`, once it is complete (`buf` keeps what follows it).
fn parse_head(buf: &mut BytesMut) -> Result<Option<Answer>, ExchangeError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::Malformed("too many headers"))
        }
        Err(_) => {
            return Err(ExchangeError::Malformed(
                "not an HTTP/1.x status line and headers",
            ))
        }
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(ExchangeError::Malformed("bad status code"))?;
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| ExchangeError::Malformed("bad header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| ExchangeError::Malformed("bad header value"))?;
        headers.append(name, value);
    }
    let rest = buf.split_off(len);
    Ok(Some(Answer {
        status,
        headers,
        rest,
    }))
}

/// Reads a refusal's body whole, framed as RFC 9112 §6.3 says for an answer to a GET:
/// chunked, `Content-Length`, or up to the app's close; none for 1xx, 204 and 304.
pub(crate) async fn read_body<S: AsyncRead + Unpin>(
    io: &mut S,
    answer: &mut Answer,
) -> Result<Bytes, ExchangeError> {
    let status = answer.status.as_u16();
    if status < 200 || status == 204 || status == 304 {
        return Ok(Bytes::new());
    }
    let chunked = answer
        .headers
        .get_all(hyper::header::TRANSFER_ENCODING)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
        });
    let buf = &mut answer.rest;
    if chunked {
        return read_chunked(io, buf).await;
    }
    let length = answer
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or(ExchangeError::Malformed("bad Content-Length"))
        })
        .transpose()?;
    match length {
        Some(n) if n > MAX_REFUSAL_BODY => Err(ExchangeError::BodyTooLarge),
        Some(n) => {
            fill(io, buf, n).await?;
            Ok(buf.split_to(n).freeze())
        }
        None => {
            // Delimited by the app's close.
            while io.read_buf(buf).await? > 0 {
                if buf.len() > MAX_REFUSAL_BODY {
                    return Err(ExchangeError::BodyTooLarge);
                }
            }
            Ok(buf.split().freeze())
        }
    }
}

/// Reads until `buf` holds at least `n` bytes.
async fn fill<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    n: usize,
) -> Result<(), ExchangeError> {
    while buf.len() < n {
        if io.read_buf(buf).await? == 0 {
            return Err(ExchangeError::Eof);
        }
    }
    Ok(())
}

/// Reads up to and including the next CRLF; the line without it.
async fn line<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<BytesMut, ExchangeError> {
    loop {
        if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf.split_to(at);
            buf.advance(2);
            return Ok(line);
        }
        if buf.len() > MAX_HEAD {
            return Err(ExchangeError::Malformed("chunk line too long"));
        }
        if io.read_buf(buf).await? == 0 {
            return Err(ExchangeError::Eof);
        }
    }
}

/// A chunked body, decoded (chunk extensions and trailers are read and dropped).
async fn read_chunked<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<Bytes, ExchangeError> {
    let mut body = BytesMut::new();
    loop {
        let size_line = line(io, buf).await?;
        let size = std::str::from_utf8(&size_line)
            .ok()
            .and_then(|l| l.split(';').next())
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .ok_or(ExchangeError::Malformed("bad chunk size"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !line(io, buf).await?.is_empty() {}
            return Ok(body.freeze());
        }
        if body.len() + size > MAX_REFUSAL_BODY {
            return Err(ExchangeError::BodyTooLarge);
        }
        fill(io, buf, size + 2).await?;
        body.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            return Err(ExchangeError::Malformed("chunk without its CRLF"));
        }
        buf.advance(size + 2);
    }
}

/// The app's side of an upgraded connection: its socket, with whatever the app sent right
/// behind its 101 read first.
pub(crate) type AppStream = ReadAhead<Box<dyn Io>>;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// The app's answer head and refusal body, read from `bytes` as an app would send them
    /// (in pieces of `step` bytes, so every partial state is crossed).
    async fn read_all(bytes: &[u8], step: usize) -> Result<(Answer, Bytes), ExchangeError> {
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut answer = loop {
            let end = (fed + step).min(bytes.len());
            buf.extend_from_slice(&bytes[fed..end]);
            fed = end;
            if let Some(answer) = parse_head(&mut buf)? {
                break answer;
            }
            if fed == bytes.len() {
                return Err(ExchangeError::Eof);
            }
        };
        let mut rest = &bytes[fed..];
        let body = read_body(&mut rest, &mut answer).await?;
        // What the app sent after the answer: whatever was read with the head, then what
        // the socket still holds.
        answer.rest.extend_from_slice(rest);
        Ok((answer, body))
    }

    #[test]
    fn heads_are_encoded_as_given() {
        let request = Request::builder()
            .method("GET")
            .uri("/chat?room=1")
            .header("host", "app:8080")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert_eq!(
            encode_head(&request),
            b"GET /chat?room=1 HTTP/1.1\r\nhost: app:8080\r\nupgrade: websocket\r\n\r\n".to_vec()
        );
    }

    #[tokio::test]
    async fn interim_answers_are_skipped() {
        let (mut ours, mut app) = tokio::io::duplex(4096);
        app.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let answer = read_head(&mut ours).await.unwrap();
        assert_eq!(answer.status, 101);
    }

    #[tokio::test]
    async fn a_101_keeps_what_follows_it() {
        for step in [1, 7, 4096] {
            let (answer, body) = read_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n\r\n\x81\x02hi",
                step,
            )
            .await
            .unwrap();
            assert_eq!(answer.status, 101);
            assert_eq!(answer.headers["upgrade"], "websocket");
            assert!(body.is_empty(), "a 101 has no body");
            assert_eq!(
                &answer.rest[..],
                b"\x81\x02hi",
                "the app's first frame is kept"
            );
        }
    }

    #[tokio::test]
    async fn refusal_bodies_by_length_chunks_or_close() {
        let cases: [(&[u8], &[u8]); 4] = [
            (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nno!\r\nextra", b"no!\r\n"),
            (
                b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
                b"abcde",
            ),
            (b"HTTP/1.0 500 Oops\r\n\r\nuntil close", b"until close"),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", b""),
        ];
        for (bytes, want) in cases {
            for step in [1, 3, 4096] {
                let (_, body) = read_all(bytes, step).await.unwrap();
                assert_eq!(&body[..], want, "{}", String::from_utf8_lossy(bytes));
            }
        }
    }

    #[tokio::test]
    async fn odd_answers_are_errors_not_panics() {
        let cases: [&[u8]; 7] = [
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 99 Low\r\n\r\n",
            b"HTTP/1.1 403 X\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 403 X\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 403 X\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 403 X\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n",
            b"HTTP/1.1 403 X\r\nContent-Length: 99999999\r\n\r\n",
        ];
        for bytes in cases {
            assert!(
                read_all(bytes, 4096).await.is_err(),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b"x-a: b\r\n".iter().copied(), 200).flatten());
        huge.extend_from_slice(b"\r\n");
        assert!(read_all(&huge, 4096).await.is_err(), "too many headers");
    }
}
