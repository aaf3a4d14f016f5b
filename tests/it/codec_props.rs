//! Property tests for the codec: header encode→parse round trips, and a client byte stream
//! decodes to the same messages however it is split into reads.

use bytes::BytesMut;
use proptest::prelude::*;
use wsgate::protocol::decoder::{Decoder, Event, MessageKind};
use wsgate::protocol::frame::{FrameHeader, OpCode, MAX_HEADER_LEN};

fn opcode() -> impl Strategy<Value = OpCode> {
    prop_oneof![
        Just(OpCode::Continuation),
        Just(OpCode::Text),
        Just(OpCode::Binary),
        Just(OpCode::Close),
        Just(OpCode::Ping),
        Just(OpCode::Pong),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn header_round_trip(fin: bool, op in opcode(), mask: Option<[u8; 4]>, len in prop_oneof![0u64..200, 65_000u64..70_000, Just(u64::MAX >> 1)]) {
        let h = FrameHeader { fin, rsv1: false, opcode: op, mask, payload_len: len };
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = h.encode(&mut out);
        let expected = 2 + match len { 0..=125 => 0, 126..=65535 => 2, _ => 8 } + if mask.is_some() { 4 } else { 0 };
        prop_assert_eq!(n, expected);
        if op.is_control() && (!fin || len > 125) {
            prop_assert!(FrameHeader::parse(&out[..n]).is_err());
        } else {
            prop_assert_eq!(FrameHeader::parse(&out[..n]).unwrap(), Some((h, n)));
        }
    }
}

/// What a client sends: whole messages (fragmented as given) with pings between fragments.
#[derive(Debug, Clone)]
struct Message {
    text: bool,
    fragments: Vec<Vec<u8>>,
    ping_after_first: Option<Vec<u8>>,
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<bool>(),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..4),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..125)),
    )
        .prop_map(|(text, fragments, ping)| {
            // Text payloads are ASCII-mapped so they are valid UTF-8.
            let fragments = if text {
                fragments
                    .into_iter()
                    .map(|f| f.into_iter().map(|b| b'a' + b % 26).collect())
                    .collect()
            } else {
                fragments
            };
            Message {
                text,
                fragments,
                ping_after_first: ping,
            }
        })
}

fn frame(fin: bool, opcode: OpCode, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    wsgate::protocol::frame::encode_frame(fin, opcode, Some(key), payload)
}

fn encode(messages: &[Message], key: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        let last = m.fragments.len() - 1;
        for (i, f) in m.fragments.iter().enumerate() {
            let op = match (i, m.text) {
                (0, true) => OpCode::Text,
                (0, false) => OpCode::Binary,
                _ => OpCode::Continuation,
            };
            out.extend(frame(i == last, op, f, key));
            if i == 0 {
                if let Some(p) = &m.ping_after_first {
                    out.extend(frame(true, OpCode::Ping, p, key));
                }
            }
        }
    }
    out
}

/// Normalised decoder output: complete messages and pings, in order.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Message(bool, Vec<u8>),
    Ping(Vec<u8>),
}

/// Feeds `stream` to a decoder in pieces cut at `cuts`, collecting what it reports.
fn decode_in_pieces(stream: &[u8], cuts: &[usize]) -> Vec<Seen> {
    let mut decoder = Decoder::new(u64::MAX);
    let mut buf = BytesMut::new();
    let mut seen = Vec::new();
    let mut current: Option<(bool, Vec<u8>)> = None;
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&stream.len())) {
        buf.extend_from_slice(&stream[start..end]);
        start = end;
        while let Some(event) = decoder.decode(&mut buf).expect("valid stream") {
            match event {
                Event::Data {
                    kind,
                    payload,
                    first,
                    fin,
                } => {
                    if first {
                        assert!(current.is_none());
                        current = Some((kind == MessageKind::Text, Vec::new()));
                    }
                    current.as_mut().unwrap().1.extend_from_slice(&payload);
                    if fin {
                        let (t, d) = current.take().unwrap();
                        seen.push(Seen::Message(t, d));
                    }
                }
                Event::Ping(p) => seen.push(Seen::Ping(p.to_vec())),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(buf.is_empty());
    seen
}

fn expected(messages: &[Message]) -> Vec<Seen> {
    let mut out = Vec::new();
    for m in messages {
        // The ping follows the first frame: inside the message unless that frame was its last.
        let ping = m.ping_after_first.clone().map(Seen::Ping);
        let whole = Seen::Message(m.text, m.fragments.concat());
        if m.fragments.len() == 1 {
            out.extend([Some(whole), ping].into_iter().flatten());
        } else {
            out.extend([ping, Some(whole)].into_iter().flatten());
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn stream_decodes_the_same_at_every_split(messages in prop::collection::vec(message(), 1..4), key: [u8; 4]) {
        let stream = encode(&messages, key);
        let want = expected(&messages);
        prop_assert_eq!(&decode_in_pieces(&stream, &[]), &want);
        for cut in 0..=stream.len() {
            prop_assert_eq!(&decode_in_pieces(&stream, &[cut]), &want, "cut at {}", cut);
        }
    }

    #[test]
    fn stream_decodes_the_same_in_random_pieces(messages in prop::collection::vec(message(), 1..6), key: [u8; 4], mut cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40)) {
        let stream = encode(&messages, key);
        let mut cuts: Vec<usize> = cuts.drain(..).map(|i| i.index(stream.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_in_pieces(&stream, &cuts), expected(&messages));
    }
}
