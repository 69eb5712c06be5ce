//! Integers written as ASCII digits straight into an output buffer, without
//! going through `fmt`: the lengths and numbers of the wire formats (HTTP
//! status, `Content-Length` and chunk sizes, RESP lengths, event ids).

use bytes::{BufMut, BytesMut};

/// Decimal digits of `v`.
pub fn put_u64(out: &mut BytesMut, v: u64) {
    out.put_slice(Decimal::unsigned(v).as_bytes());
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

/// An integer's decimal digits on the stack: a number as one argument of a
/// Redis command without a `String` for it (`format!` and `to_string` for a
/// pull's cursor, count and floor were four allocations per pull).
pub struct Decimal {
    /// Room for 20 digits, a sign and one prefix byte.
    buf: [u8; 22],
    start: usize,
}

impl Decimal {
    pub fn unsigned(mut v: u64) -> Decimal {
        let mut buf = [0u8; 22];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        Decimal { buf, start: i }
    }

    pub fn new(v: i64) -> Decimal {
        let digits = Decimal::unsigned(v.unsigned_abs());
        match v < 0 {
            true => digits.prefixed(b'-'),
            false => digits,
        }
    }

    /// The digits with `byte` before them (at most once after a sign):
    /// `(` makes a Redis range bound exclusive.
    pub fn prefixed(mut self, byte: u8) -> Decimal {
        self.start -= 1;
        self.buf[self.start] = byte;
        self
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
            let open = format!("({v}");
            assert_eq!(Decimal::new(v).prefixed(b'(').as_bytes(), open.as_bytes());
        }
        let mut out = BytesMut::new();
        put_u64(&mut out, u64::MAX);
        assert_eq!(&out[..], u64::MAX.to_string().as_bytes());
    }

    #[test]
    fn hex_digits_have_no_leading_zeros() {
        let mut big = BytesMut::new();
        put_hex(&mut big, 0x10_0000);
        put_hex(&mut big, 0);
        assert_eq!(&big[..], b"1000000");
    }
}
