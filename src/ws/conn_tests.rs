use super::*;
use crate::ws::frame::put_client_frame;

const SECOND: Duration = Duration::from_secs(1);

fn settings() -> Settings {
    Settings {
        max_message: 1000,
        ping_after: 10 * SECOND,
        write_timeout: 3 * SECOND,
    }
}

fn frame(fin: bool, op: u8, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    put_client_frame(&mut out, fin, op, payload, [1, 2, 3, 4]);
    out
}

/// The frames the server queued, decoded as a client would.
fn sent(out: &mut BytesMut) -> Vec<Incoming> {
    let mut client = Decoder::new(Side::Client, 1 << 20);
    let mut frames = Vec::new();
    while let Some(f) = client.decode(out).expect("valid server frames") {
        frames.push(f);
    }
    frames
}

#[test]
fn pings_are_answered_and_text_handed_up() {
    let t0 = Instant::now();
    let mut conn = WsConn::new(settings(), t0);
    let mut input = frame(true, opcode::PING, b"abc");
    input.extend_from_slice(&frame(true, opcode::TEXT, b"{}"));
    input.extend_from_slice(&frame(true, opcode::TEXT, b"[]"));
    let mut out = BytesMut::new();
    assert_eq!(
        conn.received(&mut input, &mut out, t0).as_deref(),
        Some(&b"{}"[..])
    );
    assert_eq!(
        conn.received(&mut input, &mut out, t0).as_deref(),
        Some(&b"[]"[..])
    );
    assert_eq!(conn.received(&mut input, &mut out, t0), None);
    assert_eq!(
        sent(&mut out),
        vec![Incoming::Pong(Bytes::from_static(b"abc"))]
    );
}

#[test]
fn a_silent_peer_is_pinged_then_closed() {
    let t0 = Instant::now();
    let mut conn = WsConn::new(settings(), t0);
    let mut out = BytesMut::new();
    assert_eq!(conn.next(t0, &mut out), Step::Run(t0 + 10 * SECOND));
    assert!(out.is_empty());
    let t1 = t0 + 10 * SECOND;
    assert_eq!(
        conn.next(t1, &mut out),
        Step::Run(t1 + 3 * SECOND),
        "the ping's own lag deadline"
    );
    assert_eq!(sent(&mut out), vec![Incoming::Ping(Bytes::new())]);
    conn.wrote(2, t1);
    // Written: now the pong is awaited for another interval.
    assert_eq!(conn.next(t1, &mut out), Step::Run(t1 + 10 * SECOND));
    // A pong (any frame) is a sign of life: the next ping is due later.
    let t2 = t1 + 4 * SECOND;
    assert_eq!(
        conn.received(&mut frame(true, opcode::PONG, b""), &mut out, t2),
        None
    );
    assert_eq!(conn.next(t2, &mut out), Step::Run(t2 + 10 * SECOND));
    // Silent after the next ping: closed with 1001, then TCP after the grace.
    let t3 = t2 + 10 * SECOND;
    conn.next(t3, &mut out);
    conn.wrote(out.len(), t3);
    out.clear();
    let t4 = t3 + 10 * SECOND;
    assert_eq!(conn.next(t4, &mut out), Step::Run(t4 + 3 * SECOND));
    assert!(matches!(
        sent(&mut out)[..],
        [Incoming::Close(Some((1001, _)))]
    ));
    assert!(!conn.is_open());
    assert_eq!(conn.next(t4 + 3 * SECOND, &mut out), Step::Finish);
}

#[test]
fn protocol_errors_close_with_their_code_and_stop_reading() {
    for (input, code) in [
        (frame(true, 0x3, b""), 1002),
        (frame(true, opcode::TEXT, b"\xff"), 1007),
        (frame(true, opcode::TEXT, &[b'a'; 1001]), 1009),
        (frame(true, opcode::BINARY, b"x"), 1003),
    ] {
        let t0 = Instant::now();
        let mut conn = WsConn::new(settings(), t0);
        let mut out = BytesMut::new();
        let mut input = input;
        input.extend_from_slice(&frame(true, opcode::TEXT, b"after"));
        assert_eq!(conn.received(&mut input, &mut out, t0), None);
        assert!(
            matches!(sent(&mut out)[..], [Incoming::Close(Some((c, _)))] if c == code),
            "{code}"
        );
        assert!(!conn.reads());
        assert_eq!(conn.next(t0, &mut out), Step::Finish);
    }
}

#[test]
fn close_handshake_both_ways() {
    // The peer closes: its code is echoed, then the connection ends.
    let t0 = Instant::now();
    let mut conn = WsConn::new(settings(), t0);
    let mut out = BytesMut::new();
    let mut input = frame(true, opcode::CLOSE, &4000u16.to_be_bytes());
    assert_eq!(conn.received(&mut input, &mut out, t0), None);
    assert_eq!(
        sent(&mut out),
        vec![Incoming::Close(Some((4000, String::new())))]
    );
    assert_eq!(conn.next(t0, &mut out), Step::Finish);
    // We close: messages meanwhile are dropped, the peer's close ends it.
    let mut conn = WsConn::new(settings(), t0);
    conn.close(1001, "shutting down", &mut out, t0);
    assert!(matches!(
        sent(&mut out)[..],
        [Incoming::Close(Some((1001, _)))]
    ));
    let mut input = frame(true, opcode::TEXT, b"late");
    input.extend_from_slice(&frame(true, opcode::CLOSE, &1000u16.to_be_bytes()));
    assert_eq!(conn.received(&mut input, &mut out, t0), None);
    assert!(out.is_empty(), "no second close");
    assert_eq!(conn.next(t0, &mut out), Step::Finish);
}

#[test]
fn output_not_written_within_the_write_timeout_lags() {
    let t0 = Instant::now();
    let mut conn = WsConn::new(settings(), t0);
    let mut out = BytesMut::new();
    conn.queued(100, t0);
    conn.queued(300, t0 + SECOND);
    assert_eq!(conn.next(t0, &mut out), Step::Run(t0 + 3 * SECOND));
    // The first batch written in time: the second's deadline applies.
    conn.wrote(150, t0 + SECOND);
    assert_eq!(
        conn.next(t0 + 2 * SECOND, &mut out),
        Step::Run(t0 + 4 * SECOND)
    );
    assert_eq!(conn.next(t0 + 4 * SECOND, &mut out), Step::Lagged);
    let now = t0 + 4 * SECOND;
    conn.lagged(&mut out, br#"{"event":"lagged"}"#, now);
    let frames = sent(&mut out);
    assert_eq!(
        frames[0],
        Incoming::Text(Bytes::from_static(br#"{"event":"lagged"}"#))
    );
    assert!(matches!(frames[1], Incoming::Close(Some((1008, _)))));
    assert_eq!(conn.next(now, &mut out), Step::Run(now + 3 * SECOND));
    assert_eq!(conn.next(now + 3 * SECOND, &mut out), Step::Finish);
}

#[test]
fn a_pings_answer_is_awaited_from_when_it_is_written() {
    let t0 = Instant::now();
    let mut conn = WsConn::new(settings(), t0);
    let mut out = BytesMut::from(&[0u8; 1000][..]);
    conn.queued(out.len(), t0);
    // Pinged behind 1000 bytes not yet written.
    let t1 = t0 + 10 * SECOND;
    conn.wrote(500, t0 + SECOND);
    assert_eq!(
        conn.next(t1, &mut out),
        Step::Lagged,
        "the first bytes waited 10 s"
    );
    let mut conn = WsConn::new(settings(), t0);
    let mut out = BytesMut::from(&[0u8; 1000][..]);
    conn.queued(out.len(), t1 - SECOND);
    assert_eq!(
        conn.next(t1, &mut out),
        Step::Run(t1 + 2 * SECOND),
        "only the lag deadline"
    );
    assert_eq!(out.len(), 1002, "the ping is queued");
    // Written 1.5 s later: the answer is due an interval after that.
    conn.wrote(1002, t1 + 1500 * Duration::from_millis(1));
    let written = t1 + Duration::from_millis(1500);
    assert_eq!(
        conn.next(written, &mut out),
        Step::Run(written + 10 * SECOND)
    );
    assert!(conn.is_open());
}
