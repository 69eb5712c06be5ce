//! The RPC tier's optional shared-secret handshake (`--rpc-secret-file`).
//!
//! The RPC port trusts its callers: whoever connects may store and read any
//! chat. Where the network between gateways and RPC servers is not trusted,
//! both sides are given the same secret and every connection starts with a
//! challenge-response before any call:
//!
//! ```text
//! server -> client   id 0, status CHALLENGE, Challenge { nonce: 32 random bytes }
//! client -> server   id 0, method HELLO,     HelloRequest { proof }
//! server -> client   id 0, status OK (empty) | BAD_FRAME (why), then it closes
//! ```
//!
//! `proof` = HMAC-SHA256(secret, [`CONTEXT`] || nonce). The secret never
//! crosses the wire, and a recorded proof is useless on another connection
//! (fresh nonce). What it does not give: confidentiality or integrity of the
//! calls that follow (there is no TLS), so an attacker who can read or
//! rewrite the traffic still can; it keeps out anyone who can merely connect.
//!
//! The codec part (frames, proofs) is pure; [`accept`] and [`connect`] are
//! the thin I/O around it, run on the socket before the connection's loop.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use hmac::{Hmac, KeyInit, Mac};
use prost::Message;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::frame::{self, Frame};
use super::{method, status};
use crate::proto::{Challenge, HelloRequest};

/// Domain separation: a proof made for this handshake means nothing anywhere
/// else the same secret might be used.
pub const CONTEXT: &[u8] = b"im-rpc-hello-v1";

/// Bytes of a challenge's nonce.
pub const NONCE_BYTES: usize = 32;

/// How long either side waits for the other's handshake frame.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Handshake frames are tiny; anything bigger is not one.
const MAX_HANDSHAKE_FRAME: usize = 1024;

type HmacSha256 = Hmac<Sha256>;

/// The proof of knowing `secret` for `nonce`.
pub fn proof(secret: &[u8], nonce: &[u8]) -> Vec<u8> {
    keyed(secret, nonce).finalize().into_bytes().to_vec()
}

/// Whether `proof` was made with `secret` for `nonce`, compared in constant
/// time.
pub fn verify(secret: &[u8], nonce: &[u8], proof: &[u8]) -> bool {
    keyed(secret, nonce).verify_slice(proof).is_ok()
}

fn keyed(secret: &[u8], nonce: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length; `load_secret` enforces >= 32 bytes.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
    mac.update(CONTEXT);
    mac.update(nonce);
    mac
}

/// A fresh nonce from the kernel's CSPRNG.
pub fn fresh_nonce() -> io::Result<[u8; NONCE_BYTES]> {
    let mut nonce = [0u8; NONCE_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut nonce))?;
    Ok(nonce)
}

/// What the server makes of the client's first frame: `Ok` or the reason it
/// refuses (sent back in a BAD_FRAME reply).
pub fn check_hello(secret: &[u8], nonce: &[u8], frame: &Frame) -> Result<(), &'static str> {
    if frame.method_or_status != method::HELLO {
        return Err("this rpc server requires the shared-secret handshake (--rpc-secret-file)");
    }
    let hello = HelloRequest::decode(frame.body.clone()).map_err(|_| "undecodable hello")?;
    if !verify(secret, nonce, &hello.proof) {
        return Err("rpc handshake failed: the shared secrets differ");
    }
    Ok(())
}

/// The client's answer to a challenge frame.
pub fn answer(secret: &[u8], challenge: &Frame) -> io::Result<HelloRequest> {
    if challenge.id != 0 || challenge.method_or_status != status::CHALLENGE {
        return Err(refused(
            "the rpc server did not open with a challenge: is --rpc-secret-file set on it too?",
        ));
    }
    let challenge = Challenge::decode(challenge.body.clone())
        .map_err(|_| refused("undecodable challenge from the rpc server"))?;
    Ok(HelloRequest {
        proof: proof(secret, &challenge.nonce),
    })
}

/// Server side: challenges a new connection. `Ok` once the client has
/// proven it knows `secret`; an error (after telling the client why, when it
/// answered at all) otherwise, and the connection must be closed.
pub async fn accept(socket: &mut TcpStream, secret: &[u8]) -> io::Result<()> {
    let nonce = fresh_nonce()?;
    let mut out = BytesMut::new();
    let challenge = Challenge {
        nonce: nonce.to_vec(),
    };
    frame::encode(&mut out, 0, status::CHALLENGE, &challenge);
    socket.write_all(&out).await?;
    let hello = read_frame(socket).await?;
    out.clear();
    let result = check_hello(secret, &nonce, &hello);
    match result {
        Ok(()) => frame::encode_raw(&mut out, hello.id, status::OK, &[]),
        Err(why) => frame::encode_raw(&mut out, hello.id, status::BAD_FRAME, why.as_bytes()),
    }
    socket.write_all(&out).await?;
    result.map_err(refused)
}

/// Client side: answers the server's challenge on a new connection.
pub async fn connect(socket: &mut TcpStream, secret: &[u8]) -> io::Result<()> {
    let challenge = read_frame(socket).await?;
    let hello = answer(secret, &challenge)?;
    let mut out = BytesMut::new();
    frame::encode(&mut out, 0, method::HELLO, &hello);
    socket.write_all(&out).await?;
    let reply = read_frame(socket).await?;
    if reply.method_or_status != status::OK {
        let why = String::from_utf8_lossy(&reply.body);
        return Err(refused(&format!(
            "the rpc server refused the handshake: {why}"
        )));
    }
    Ok(())
}

/// One frame, within [`TIMEOUT`]. Bytes read past it are dropped: neither
/// side sends more until the other has answered (the client waits for the
/// OK before its first call), so only a peer breaking the protocol loses any.
async fn read_frame(socket: &mut TcpStream) -> io::Result<Frame> {
    let read = async {
        let mut input = BytesMut::with_capacity(128);
        loop {
            if let Some(frame) = frame::decode(&mut input, MAX_HANDSHAKE_FRAME)? {
                return Ok(frame);
            }
            if socket.read_buf(&mut input).await? == 0 {
                return Err(refused(
                    "the peer closed the connection during the handshake",
                ));
            }
        }
    };
    tokio::time::timeout(TIMEOUT, read)
        .await
        .map_err(|_| refused("no handshake frame within 5 s"))?
}

fn refused(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, why.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn hello_frame(proof: Vec<u8>) -> Frame {
        Frame {
            id: 0,
            method_or_status: method::HELLO,
            body: Bytes::from(HelloRequest { proof }.encode_to_vec()),
        }
    }

    #[test]
    fn a_proof_verifies_for_its_secret_and_nonce_only() {
        let nonce = fresh_nonce().expect("urandom");
        let good = proof(SECRET, &nonce);
        assert!(verify(SECRET, &nonce, &good));
        assert!(!verify(
            b"another secret of thirty-two bytes",
            &nonce,
            &good
        ));
        assert!(!verify(SECRET, &fresh_nonce().expect("urandom"), &good));
        assert!(!verify(SECRET, &nonce, &good[..31]));
    }

    #[test]
    fn the_server_refuses_anything_but_a_valid_hello() {
        let nonce = [7u8; NONCE_BYTES];
        assert!(check_hello(SECRET, &nonce, &hello_frame(proof(SECRET, &nonce))).is_ok());
        assert!(check_hello(SECRET, &nonce, &hello_frame(proof(SECRET, &[8u8; 32]))).is_err());
        let ping = Frame {
            id: 1,
            method_or_status: method::PING,
            body: Bytes::new(),
        };
        assert!(check_hello(SECRET, &nonce, &ping).is_err());
        let garbage = Frame {
            id: 0,
            method_or_status: method::HELLO,
            body: Bytes::from_static(b"\xff\xff\xff"),
        };
        assert!(check_hello(SECRET, &nonce, &garbage).is_err());
    }

    #[test]
    fn the_client_answers_only_a_challenge() {
        let nonce = [9u8; NONCE_BYTES];
        let challenge = Frame {
            id: 0,
            method_or_status: status::CHALLENGE,
            body: Bytes::from(
                Challenge {
                    nonce: nonce.to_vec(),
                }
                .encode_to_vec(),
            ),
        };
        let hello = answer(SECRET, &challenge).expect("answered");
        assert!(verify(SECRET, &nonce, &hello.proof));
        let goaway = Frame {
            id: 0,
            method_or_status: status::GOAWAY,
            body: Bytes::new(),
        };
        assert!(answer(SECRET, &goaway).is_err());
    }
}
