//! Integers written as ASCII digits straight into an output buffer, without
//! going through `fmt`: the lengths and numbers of the wire formats (HTTP
//! status, `Content-Length` and chunk sizes, RESP lengths, event ids).

use bytes::{BufMut, BytesMut};

/// Decimal digits of `v`.
pub fn put_u64(out: &mut BytesMut, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
}

/// Lower-case hexadecimal digits of `v` (a chunk size).
pub fn put_hex(out: &mut BytesMut, mut v: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[v % 16];
        v /= 16;
        if v == 0 {
            break;
        }
    }
    out.put_slice(&digits[i..]);
}

/// A signed integer's decimal digits on the stack: a number as one argument
/// of a Redis command without a `String` for it (`format!` and `to_string`
/// for a pull's cursor, count and floor were four allocations per pull).
pub struct Decimal {
    buf: [u8; 21],
    start: usize,
}

impl Decimal {
    pub fn new(v: i64) -> Decimal {
        let mut buf = [0u8; 21];
        let mut i = buf.len();
        let mut rest = v.unsigned_abs();
        loop {
            i -= 1;
            buf[i] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if v < 0 {
            i -= 1;
            buf[i] = b'-';
        }
        Decimal { buf, start: i }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_read_as_display_does() {
        for v in [0, 7, -7, 10, 1_700_000_000_000_000, i64::MAX, i64::MIN] {
            assert_eq!(Decimal::new(v).as_bytes(), v.to_string().as_bytes());
        }
    }

    #[test]
    fn hex_digits_have_no_leading_zeros() {
        let mut big = BytesMut::new();
        put_hex(&mut big, 0x10_0000);
        put_hex(&mut big, 0);
        assert_eq!(&big[..], b"1000000");
    }
}
