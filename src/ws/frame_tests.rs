use super::*;

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn server() -> Decoder {
    Decoder::new(Side::Server, 1 << 20)
}

fn client_frame(fin: bool, op: u8, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    put_client_frame(&mut out, fin, op, payload, KEY);
    out
}

fn decode_all(decoder: &mut Decoder, mut input: BytesMut) -> Result<Vec<Incoming>, FrameError> {
    let mut out = Vec::new();
    while let Some(m) = decoder.decode(&mut input)? {
        out.push(m);
    }
    assert!(input.is_empty(), "bytes left: {input:?}");
    Ok(out)
}

#[test]
fn the_rfc_example_masked_hello_decodes() {
    // RFC 6455 §5.7: a single-frame masked text message "Hello".
    let mut input = BytesMut::from(
        &[
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ][..],
    );
    let got = server().decode(&mut input).unwrap();
    assert_eq!(got, Some(Incoming::Text(Bytes::from_static(b"Hello"))));
    // And the server's unmasked encoding of it is the RFC's too.
    let mut out = BytesMut::new();
    put_frame(&mut out, opcode::TEXT, b"Hello");
    assert_eq!(&out[..], &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
}

#[test]
fn every_length_encoding_round_trips_split_at_every_byte() {
    for len in [0usize, 1, 7, 8, 9, 125, 126, 127, 65535, 65536, 70000] {
        let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let whole = client_frame(true, opcode::TEXT, &payload);
        // Fed one byte at a time for the small ones: never a message early.
        let step = if len < 300 { 1 } else { 4093 };
        let mut decoder = server();
        let mut input = BytesMut::new();
        let mut got = None;
        for chunk in whole.chunks(step) {
            assert!(got.is_none());
            input.extend_from_slice(chunk);
            got = decoder.decode(&mut input).unwrap();
        }
        assert_eq!(got, Some(Incoming::Text(Bytes::from(payload))), "len {len}");
    }
}

#[test]
fn fragments_reassemble_with_control_frames_between() {
    let mut input = client_frame(false, opcode::TEXT, "héllo ".as_bytes());
    input.extend_from_slice(&client_frame(true, opcode::PING, b"p"));
    // A fragment boundary inside a UTF-8 sequence is fine: checked whole.
    let word = "wörld".as_bytes();
    input.extend_from_slice(&client_frame(false, opcode::CONTINUATION, &word[..2]));
    input.extend_from_slice(&client_frame(true, opcode::CONTINUATION, &word[2..]));
    let got = decode_all(&mut server(), input).unwrap();
    assert_eq!(
        got,
        vec![
            Incoming::Ping(Bytes::from_static(b"p")),
            Incoming::Text(Bytes::from("héllo wörld".as_bytes())),
        ]
    );
}

#[test]
fn framing_violations_are_protocol_errors() {
    let unmasked = {
        let mut out = BytesMut::new();
        put_frame(&mut out, opcode::TEXT, b"hi");
        out
    };
    let mut reserved = client_frame(true, opcode::TEXT, b"hi");
    reserved[0] |= 0x40;
    let cases: Vec<(&str, BytesMut)> = vec![
        ("unmasked", unmasked),
        ("reserved bit", reserved),
        ("opcode 3", client_frame(true, 0x3, b"")),
        ("opcode 0xB", client_frame(true, 0xB, b"")),
        ("fragmented ping", client_frame(false, opcode::PING, b"")),
        ("long ping", client_frame(true, opcode::PING, &[0; 126])),
        (
            "lone continuation",
            client_frame(true, opcode::CONTINUATION, b"x"),
        ),
        ("one-byte close", client_frame(true, opcode::CLOSE, b"\x03")),
        (
            "close code 1005",
            client_frame(true, opcode::CLOSE, &1005u16.to_be_bytes()),
        ),
        (
            "close code 999",
            client_frame(true, opcode::CLOSE, &999u16.to_be_bytes()),
        ),
        (
            "close code 5000",
            client_frame(true, opcode::CLOSE, &5000u16.to_be_bytes()),
        ),
        ("new message mid-fragment", {
            let mut b = client_frame(false, opcode::TEXT, b"a");
            b.extend_from_slice(&client_frame(true, opcode::TEXT, b"b"));
            b
        }),
    ];
    for (what, input) in cases {
        let err = decode_all(&mut server(), input).expect_err(what);
        assert_eq!(
            err.close_code(),
            close_code::PROTOCOL_ERROR,
            "{what}: {err:?}"
        );
    }
    // A client refuses masked frames.
    let err = decode_all(
        &mut Decoder::new(Side::Client, 100),
        client_frame(true, 1, b"x"),
    );
    assert_eq!(err.unwrap_err().close_code(), 1002);
    // A 64-bit length with its top bit set.
    let mut huge = BytesMut::from(&[0x81u8, 0xFF][..]);
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    huge.extend_from_slice(&KEY);
    assert_eq!(server().decode(&mut huge).unwrap_err().close_code(), 1002);
}

#[test]
fn invalid_utf8_is_1007_and_binary_is_not_checked() {
    let err = decode_all(&mut server(), client_frame(true, opcode::TEXT, b"ok \xff")).unwrap_err();
    assert_eq!(err, FrameError::InvalidUtf8);
    assert_eq!(err.close_code(), 1007);
    // A sequence cut at the message's end.
    let err = decode_all(
        &mut server(),
        client_frame(true, opcode::TEXT, "é".as_bytes().split_at(1).0),
    );
    assert_eq!(err.unwrap_err().close_code(), 1007);
    let mut bad_reason = 1000u16.to_be_bytes().to_vec();
    bad_reason.push(0xC0);
    let err = decode_all(
        &mut server(),
        client_frame(true, opcode::CLOSE, &bad_reason),
    );
    assert_eq!(err.unwrap_err().close_code(), 1007);
    let got = decode_all(&mut server(), client_frame(true, opcode::BINARY, b"\xff")).unwrap();
    assert_eq!(got, vec![Incoming::Binary(Bytes::from_static(b"\xff"))]);
}

#[test]
fn size_is_checked_from_the_heads_before_any_payload_arrives() {
    let mut decoder = Decoder::new(Side::Server, 100);
    // Exactly the limit is fine.
    let got = decode_all(&mut decoder, client_frame(true, opcode::TEXT, &[b'a'; 100])).unwrap();
    assert_eq!(got.len(), 1);
    // One frame's head announcing 101 bytes: refused with only the head read.
    let whole = client_frame(true, opcode::TEXT, &[b'a'; 101]);
    let mut head_only = BytesMut::from(&whole[..8]);
    assert_eq!(decoder.decode(&mut head_only), Err(FrameError::TooBig));
    // Fragments adding up past it.
    let mut decoder = Decoder::new(Side::Server, 100);
    let mut input = client_frame(false, opcode::TEXT, &[b'a'; 60]);
    input.extend_from_slice(&client_frame(true, opcode::CONTINUATION, &[b'a'; 41])[..8]);
    assert_eq!(
        decode_all(&mut decoder, input).unwrap_err().close_code(),
        1009
    );
}

#[test]
fn close_frames_carry_code_and_reason() {
    let mut out = BytesMut::new();
    put_close(&mut out, 1000, "bye");
    assert_eq!(&out[..], b"\x88\x05\x03\xe8bye");
    let mut body = 4000u16.to_be_bytes().to_vec();
    body.extend_from_slice("ciao".as_bytes());
    let got = decode_all(&mut server(), client_frame(true, opcode::CLOSE, &body)).unwrap();
    assert_eq!(got, vec![Incoming::Close(Some((4000, "ciao".into())))]);
    let got = decode_all(&mut server(), client_frame(true, opcode::CLOSE, b"")).unwrap();
    assert_eq!(got, vec![Incoming::Close(None)]);
    // A long reason is cut on a character boundary to fit 125 bytes.
    let mut out = BytesMut::new();
    put_close(&mut out, 1008, &"é".repeat(100));
    assert_eq!(out[1] as usize, 2 + 122);
    let mut client = Decoder::new(Side::Client, 1000);
    assert!(matches!(
        client.decode(&mut out),
        Ok(Some(Incoming::Close(Some((1008, _)))))
    ));
}

#[test]
fn masking_matches_a_byte_by_byte_xor_at_every_length() {
    for len in 0..40 {
        let data: Vec<u8> = (0..len as u8).collect();
        let mut fast = data.clone();
        apply_mask(&mut fast, KEY);
        let slow: Vec<u8> = data
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ KEY[i % 4])
            .collect();
        assert_eq!(fast, slow, "len {len}");
    }
}

/// The fuzz target's main property (fuzz/fuzz_targets/ws_frame.rs) as a
/// plain test over pseudo-random inputs: valid frames, mutated frames and
/// noise, decoded whole and in random chunks, give the same messages and
/// the same error, and every message respects the limits.
#[test]
fn property_random_frames_decode_the_same_whole_and_in_chunks() {
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..3000 {
        let mut wire = BytesMut::new();
        for _ in 0..(next() % 6) {
            let op = [0u8, 1, 2, 8, 9, 10, 3][(next() % 7) as usize];
            let len = [0usize, 1, 5, 125, 126, 300][(next() % 6) as usize];
            let payload: Vec<u8> = (0..len).map(|_| (next() % 128) as u8).collect();
            put_client_frame(&mut wire, next() % 4 != 0, op, &payload, KEY);
        }
        // Flip a few bytes, or append noise.
        for _ in 0..(next() % 3) {
            if !wire.is_empty() {
                let i = (next() % wire.len() as u64) as usize;
                wire[i] ^= (next() % 256) as u8;
            }
        }
        let max = 16 + (next() % 400) as usize;
        let whole = collect(&[&wire[..]], max);
        let mut chunks = Vec::new();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let n = (1 + next() % 50) as usize;
            let (a, b) = rest.split_at(n.min(rest.len()));
            chunks.push(a);
            rest = b;
        }
        assert_eq!(whole, collect(&chunks, max), "{wire:?}");
        for m in &whole.0 {
            match m {
                Incoming::Text(t) => assert!(t.len() <= max && std::str::from_utf8(t).is_ok()),
                Incoming::Binary(b) => assert!(b.len() <= max),
                Incoming::Ping(p) | Incoming::Pong(p) => assert!(p.len() <= MAX_CONTROL_PAYLOAD),
                Incoming::Close(_) => {}
            }
        }
    }
}

fn collect(chunks: &[&[u8]], max: usize) -> (Vec<Incoming>, Option<FrameError>) {
    let mut decoder = Decoder::new(Side::Server, max);
    let mut input = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        input.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(err) => return (out, Some(err)),
            }
        }
    }
    (out, None)
}

/// A run of frames written by `put_frame`, walked back frame by frame,
/// for each length form (7-bit, 16-bit, 64-bit); a cut frame is not whole.
#[test]
fn sent_frames_are_walked_by_their_lengths() {
    let sizes = [0usize, 1, 125, 126, 0xFFFF, 0x1_0000];
    let mut run = BytesMut::new();
    for &n in &sizes {
        put_frame(&mut run, opcode::TEXT, &vec![b'x'; n]);
    }
    let mut rest = &run[..];
    for &n in &sizes {
        let len = sent_frame_len(rest).expect("a whole frame");
        let head = match n {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        };
        assert_eq!(len, head + n, "a frame of {n} bytes");
        rest = &rest[len..];
    }
    assert!(rest.is_empty());
    let mut one = BytesMut::new();
    put_frame(&mut one, opcode::TEXT, &[b'y'; 300]);
    for cut in [0, 1, 3, 303] {
        assert_eq!(sent_frame_len(&one[..cut]), None, "cut at {cut}");
    }
    assert_eq!(sent_frame_len(&one), Some(304));
}
