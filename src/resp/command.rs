//! Commands as RESP arrays of bulk strings, written straight into a buffer.

use bytes::{BufMut, Bytes, BytesMut};

use crate::digits::put_u64;

/// Encodes a command (`args[0]` is its name) as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Bytes {
    let mut out = BytesMut::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.put_u8(b'*');
    put_u64(&mut out, args.len() as u64);
    out.put_slice(b"\r\n");
    for arg in args {
        out.put_u8(b'$');
        put_u64(&mut out, arg.len() as u64);
        out.put_slice(b"\r\n");
        out.put_slice(arg);
        out.put_slice(b"\r\n");
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis_protocol::resp2::decode::decode_bytes;
    use redis_protocol::resp2::types::BytesFrame;

    #[test]
    fn encodes_binary_safe_arrays() {
        let wire = encode(&[b"ZADD", b"im:{a:b}", b"17", b"\r\n\x00\xff"]);
        assert_eq!(
            &wire[..],
            b"*4\r\n$4\r\nZADD\r\n$8\r\nim:{a:b}\r\n$2\r\n17\r\n$4\r\n\r\n\x00\xff\r\n"
        );
        let (frame, used) = decode_bytes(&wire).expect("valid RESP").expect("complete");
        assert_eq!(used, wire.len());
        let BytesFrame::Array(items) = frame else {
            panic!("not an array")
        };
        assert_eq!(
            items[3],
            BytesFrame::BulkString(Bytes::from_static(b"\r\n\x00\xff"))
        );
    }
}
