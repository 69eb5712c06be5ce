//! Commands as RESP arrays of bulk strings, written straight into a buffer.

use bytes::{BufMut, Bytes, BytesMut};

use crate::digits::put_u64;

/// Encodes a command (`args[0]` is its name) as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Bytes {
    let bytes = args.iter().map(|a| a.len()).sum();
    let mut command = Writer::new(args.len(), bytes);
    for arg in args {
        command.arg(arg);
    }
    command.finish()
}

/// A command written argument by argument, for arguments that are not one
/// slice each: [`Writer::arg_parts`] writes one argument from several.
pub struct Writer {
    out: BytesMut,
}

impl Writer {
    /// A command of `args` arguments (its name among them) of about `bytes`
    /// bytes in all.
    pub fn new(args: usize, bytes: usize) -> Writer {
        let mut out = BytesMut::with_capacity(16 + 16 * args + bytes);
        out.put_u8(b'*');
        put_u64(&mut out, args as u64);
        out.put_slice(b"\r\n");
        Writer { out }
    }

    pub fn arg(&mut self, arg: &[u8]) {
        self.out.put_u8(b'$');
        put_u64(&mut self.out, arg.len() as u64);
        self.out.put_slice(b"\r\n");
        self.out.put_slice(arg);
        self.out.put_slice(b"\r\n");
    }

    /// One argument: `parts`, back to back.
    pub fn arg_parts(&mut self, parts: &[&[u8]]) {
        self.out.put_u8(b'$');
        put_u64(
            &mut self.out,
            parts.iter().map(|p| p.len()).sum::<usize>() as u64,
        );
        self.out.put_slice(b"\r\n");
        for part in parts {
            self.out.put_slice(part);
        }
        self.out.put_slice(b"\r\n");
    }

    /// The command; it must have as many arguments as [`Writer::new`] said.
    pub fn finish(self) -> Bytes {
        self.out.freeze()
    }
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

    #[test]
    fn an_argument_may_be_written_in_parts() {
        let mut command = Writer::new(2, 8);
        command.arg(b"SET");
        command.arg_parts(&[b"ab", b"", b"c"]);
        assert_eq!(&command.finish()[..], b"*2\r\n$3\r\nSET\r\n$3\r\nabc\r\n");
    }
}
