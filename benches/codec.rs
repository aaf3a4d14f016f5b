//! Codec micro-benchmarks: unmasking, header parse/encode, and decoding a stream of frames.
//! Run: cargo bench --bench codec

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use wsgate::protocol::decoder::Decoder;
use wsgate::protocol::frame::{
    apply_mask, apply_mask_bytewise, FrameHeader, OpCode, MAX_HEADER_LEN,
};

fn unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    for size in [1024usize, 64 * 1024, 1024 * 1024] {
        let mut buf = vec![0xA5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("word", size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), [1, 2, 3, 4], 1))
        });
        if size == 64 * 1024 {
            g.bench_with_input(BenchmarkId::new("bytewise", size), &size, |b, _| {
                b.iter(|| apply_mask_bytewise(black_box(&mut buf), [1, 2, 3, 4], 1))
            });
        }
    }
    g.finish();
}

fn header(c: &mut Criterion) {
    let h = FrameHeader {
        fin: true,
        rsv1: false,
        opcode: OpCode::Binary,
        mask: Some([1, 2, 3, 4]),
        payload_len: 70_000,
    };
    let mut out = [0u8; MAX_HEADER_LEN];
    let n = h.encode(&mut out);
    c.bench_function("header/parse", |b| {
        b.iter(|| FrameHeader::parse(black_box(&out[..n])))
    });
    c.bench_function("header/encode", |b| {
        b.iter(|| black_box(&h).encode(&mut out))
    });
}

fn masked_stream(frame_size: usize, total: usize) -> Vec<u8> {
    let mut stream = Vec::with_capacity(total + total / frame_size * 14);
    let payload = vec![0x42u8; frame_size];
    while stream.len() < total {
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = FrameHeader {
            fin: true,
            rsv1: false,
            opcode: OpCode::Binary,
            mask: Some([9, 8, 7, 6]),
            payload_len: frame_size as u64,
        }
        .encode(&mut out);
        stream.extend_from_slice(&out[..n]);
        stream.extend_from_slice(&payload);
    }
    stream
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for frame_size in [32usize, 1024, 64 * 1024] {
        let stream = masked_stream(frame_size, 1 << 20);
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("frames", frame_size),
            &stream,
            |b, stream| {
                b.iter(|| {
                    let mut d = Decoder::new(u64::MAX);
                    let mut buf = BytesMut::from(&stream[..]);
                    let mut n = 0usize;
                    while let Some(e) = d.decode(&mut buf).unwrap() {
                        black_box(&e);
                        n += 1;
                    }
                    n
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, unmask, header, decode);
criterion_main!(benches);
