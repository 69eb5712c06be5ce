//! The RPC tier's optional shared-secret handshake (`--rpc-secret-file`).
//!
//! The RPC port trusts its callers: whoever connects may store and read any
//! chat. Where the network between gateways and RPC servers is not trusted,
//! both sides are given the same secret and every connection starts with a
//! mutual challenge-response before any call:
//!
//! ```text
//! server -> client   id 0, status CHALLENGE, Challenge { nonce: Ns }
//! client -> server   id 0, method HELLO,     HelloRequest { proof, client_nonce: Nc, server: S }
//! server -> client   id 0, status OK, HelloResponse { proof } | BAD_FRAME (why), then it closes
//! ```
//!
//! Each proof is HMAC-SHA256(secret, [`CONTEXT`], role, S, Ns, Nc) (fields
//! length-prefixed; role `client` or `server`), where S is the address the
//! client dialled. The secret never crosses the wire; a recorded proof is
//! useless on another connection (fresh nonces on both sides); the client
//! checks the server's proof, so a server without the secret (a rogue
//! endpoint registered in etcd, a listed address someone else took over)
//! gets no calls. And a relay gains nothing: a client that dialled the relay
//! proves for the relay's address, which the real server does not accept
//! as its own (its listening address, or `--rpc-advertise` when gateways
//! reach it by another address, behind NAT).
//!
//! What it does not give: confidentiality or integrity of the calls that
//! follow (there is no TLS), so an attacker who can read or rewrite the
//! traffic on the path still can; it keeps out anyone who can merely
//! connect, or make a gateway connect to them.
//!
//! The codec part (frames, proofs) is pure; [`accept`] and [`connect`] are
//! the thin I/O around it, run on the socket before the connection's loop.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use hmac::{Hmac, KeyInit, Mac};
use prost::Message;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::frame::{self, Frame};
use super::{method, status};
use crate::proto::{Challenge, HelloRequest, HelloResponse};

/// Domain separation: a proof made for this handshake means nothing anywhere
/// else the same secret might be used (v2: both nonces and the server's
/// address; a v1 proof never verifies as one).
pub const CONTEXT: &[u8] = b"im-rpc-hello-v2";

/// Bytes of a challenge's nonce.
pub const NONCE_BYTES: usize = 32;

/// How long either side waits for the other's handshake frame.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Handshake frames are tiny; anything bigger is not one.
const MAX_HANDSHAKE_FRAME: usize = 1024;

type HmacSha256 = Hmac<Sha256>;

/// Which side a proof is from: neither side's proof passes as the other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// The proof of knowing `secret`, by `role`, for a connection to `server`
/// (the address the client dialled) with these nonces.
pub fn proof(
    secret: &[u8],
    role: Role,
    server: &str,
    server_nonce: &[u8],
    client_nonce: &[u8],
) -> Vec<u8> {
    keyed(secret, role, server, server_nonce, client_nonce)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Whether `proof` is [`proof`]'s for these inputs, compared in constant time.
pub fn verify(
    secret: &[u8],
    role: Role,
    server: &str,
    nonces: (&[u8], &[u8]),
    proof: &[u8],
) -> bool {
    keyed(secret, role, server, nonces.0, nonces.1)
        .verify_slice(proof)
        .is_ok()
}

fn keyed(
    secret: &[u8],
    role: Role,
    server: &str,
    server_nonce: &[u8],
    client_nonce: &[u8],
) -> HmacSha256 {
    // HMAC takes a key of any length; `load_secret` enforces >= 32 bytes.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
    mac.update(CONTEXT);
    let role: &[u8] = match role {
        Role::Client => b"client",
        Role::Server => b"server",
    };
    // Length-prefixed, so no two different field lists hash alike.
    for field in [role, server.as_bytes(), server_nonce, client_nonce] {
        mac.update(&(field.len() as u32).to_be_bytes());
        mac.update(field);
    }
    mac
}

/// A fresh nonce from the kernel's CSPRNG.
pub fn fresh_nonce() -> io::Result<[u8; NONCE_BYTES]> {
    let mut nonce = [0u8; NONCE_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut nonce))?;
    Ok(nonce)
}

/// An address as both sides spell it: a socket address in its canonical
/// form (an IPv4 client of a dual-stack socket as IPv4), anything else
/// (a name given to `--rpc-advertise`) as given.
pub fn identity(addr: &str) -> String {
    match addr.trim().parse::<SocketAddr>() {
        Ok(SocketAddr::V6(v6)) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())).to_string(),
            None => v6.to_string(),
        },
        Ok(v4) => v4.to_string(),
        Err(_) => addr.trim().to_string(),
    }
}

/// What the server makes of the client's first frame: the OK's body, or
/// the reason it refuses (sent back in a BAD_FRAME reply). `names` are the
/// server's own addresses ([`identity`]s).
pub fn check_hello(
    secret: &[u8],
    nonce: &[u8],
    names: &[String],
    frame: &Frame,
) -> Result<HelloResponse, &'static str> {
    if frame.method_or_status != method::HELLO {
        return Err("this rpc server requires the shared-secret handshake (--rpc-secret-file)");
    }
    let hello = HelloRequest::decode(frame.body.clone()).map_err(|_| "undecodable hello")?;
    if hello.client_nonce.len() != NONCE_BYTES {
        return Err("rpc handshake failed: no client nonce (an older im-server?)");
    }
    let server = identity(&hello.server);
    if !names.contains(&server) {
        return Err(
            "rpc handshake failed: the client dialled another address than this server's (a relay? else set --rpc-advertise to the address gateways dial)",
        );
    }
    let nonces = (nonce, &hello.client_nonce[..]);
    if !verify(secret, Role::Client, &server, nonces, &hello.proof) {
        return Err("rpc handshake failed: the shared secrets differ");
    }
    Ok(HelloResponse {
        proof: proof(secret, Role::Server, &server, nonce, &hello.client_nonce),
    })
}

/// The client's answer to a challenge frame, for a connection it dialled
/// to `server`, with its own nonce.
pub fn answer(
    secret: &[u8],
    server: &str,
    challenge: &Frame,
    client_nonce: &[u8],
) -> io::Result<(HelloRequest, Vec<u8>)> {
    if challenge.id != 0 || challenge.method_or_status != status::CHALLENGE {
        return Err(refused(
            "the rpc server did not open with a challenge: is --rpc-secret-file set on it too?",
        ));
    }
    let challenge = Challenge::decode(challenge.body.clone())
        .map_err(|_| refused("undecodable challenge from the rpc server"))?;
    let server = identity(server);
    let hello = HelloRequest {
        proof: proof(
            secret,
            Role::Client,
            &server,
            &challenge.nonce,
            client_nonce,
        ),
        client_nonce: client_nonce.to_vec(),
        server,
    };
    Ok((hello, challenge.nonce))
}

/// Whether the server's reply to `hello` proves it knows the secret.
pub fn check_welcome(
    secret: &[u8],
    hello: &HelloRequest,
    server_nonce: &[u8],
    reply: &Frame,
) -> io::Result<()> {
    if reply.method_or_status != status::OK {
        let why = String::from_utf8_lossy(&reply.body);
        return Err(refused(&format!(
            "the rpc server refused the handshake: {why}"
        )));
    }
    let welcome = HelloResponse::decode(reply.body.clone())
        .map_err(|_| refused("undecodable handshake reply from the rpc server"))?;
    let nonces = (server_nonce, &hello.client_nonce[..]);
    if !verify(secret, Role::Server, &hello.server, nonces, &welcome.proof) {
        return Err(refused(
            "the rpc server did not prove it knows the shared secret: not ours",
        ));
    }
    Ok(())
}

/// Server side: challenges a new connection. `Ok` once the client has
/// proven it knows `secret` for a connection to one of `names` (this
/// server's addresses); an error (after telling the client why, when it
/// answered at all) otherwise, and the connection must be closed.
pub async fn accept(
    socket: &mut TcpStream,
    secret: &[u8],
    names: &[String],
    timeout: Duration,
) -> io::Result<()> {
    let nonce = fresh_nonce()?;
    let mut out = BytesMut::new();
    let challenge = Challenge {
        nonce: nonce.to_vec(),
    };
    frame::encode(&mut out, 0, status::CHALLENGE, &challenge);
    socket.write_all(&out).await?;
    let hello = read_frame_within(socket, timeout).await?;
    out.clear();
    let result = check_hello(secret, &nonce, names, &hello);
    match &result {
        Ok(welcome) => frame::encode(&mut out, hello.id, status::OK, welcome),
        Err(why) => frame::encode_raw(&mut out, hello.id, status::BAD_FRAME, why.as_bytes()),
    }
    socket.write_all(&out).await?;
    result.map(drop).map_err(refused)
}

/// Client side: answers the server's challenge on a new connection it
/// dialled to `server`, and checks the server's proof.
pub async fn connect(socket: &mut TcpStream, secret: &[u8], server: &str) -> io::Result<()> {
    let challenge = read_frame(socket).await?;
    let (hello, server_nonce) = answer(secret, server, &challenge, &fresh_nonce()?)?;
    let mut out = BytesMut::new();
    frame::encode(&mut out, 0, method::HELLO, &hello);
    socket.write_all(&out).await?;
    let reply = read_frame(socket).await?;
    check_welcome(secret, &hello, &server_nonce, &reply)
}

/// One frame, within [`TIMEOUT`]. Bytes read past it are dropped: neither
/// side sends more until the other has answered (the client waits for the
/// OK before its first call), so only a peer breaking the protocol loses any.
async fn read_frame(socket: &mut TcpStream) -> io::Result<Frame> {
    read_frame_within(socket, TIMEOUT).await
}

/// [`read_frame`] with another timeout (the server's, for a client that has
/// not proven anything yet, is shorter).
pub async fn read_frame_within(socket: &mut TcpStream, timeout: Duration) -> io::Result<Frame> {
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
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| refused("no handshake frame in time"))?
}

fn refused(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, why.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const SERVER: &str = "127.0.0.1:8888";

    fn frame(id: u64, kind: u8, body: Vec<u8>) -> Frame {
        Frame {
            id,
            method_or_status: kind,
            body: Bytes::from(body),
        }
    }

    fn challenge(nonce: &[u8]) -> Frame {
        let body = Challenge {
            nonce: nonce.to_vec(),
        };
        frame(0, status::CHALLENGE, body.encode_to_vec())
    }

    #[test]
    fn a_proof_verifies_for_its_secret_role_server_and_nonces_only() {
        let (ns, nc) = (
            fresh_nonce().expect("urandom"),
            fresh_nonce().expect("urandom"),
        );
        let good = proof(SECRET, Role::Client, SERVER, &ns, &nc);
        assert!(verify(SECRET, Role::Client, SERVER, (&ns, &nc), &good));
        assert!(!verify(
            b"another secret of thirty-two bytes",
            Role::Client,
            SERVER,
            (&ns, &nc),
            &good
        ));
        assert!(!verify(SECRET, Role::Server, SERVER, (&ns, &nc), &good));
        assert!(!verify(
            SECRET,
            Role::Client,
            "127.0.0.1:9999",
            (&ns, &nc),
            &good
        ));
        assert!(!verify(SECRET, Role::Client, SERVER, (&nc, &ns), &good));
        assert!(!verify(
            SECRET,
            Role::Client,
            SERVER,
            (&ns, &fresh_nonce().expect("urandom")),
            &good
        ));
        assert!(!verify(
            SECRET,
            Role::Client,
            SERVER,
            (&ns, &nc),
            &good[..31]
        ));
    }

    #[test]
    fn both_sides_prove_and_a_relayed_hello_is_refused() {
        let ns = [7u8; NONCE_BYTES];
        let nc = [8u8; NONCE_BYTES];
        let names = vec![identity(SERVER)];
        // The client dialled the server itself: accepted, and the server's
        // proof satisfies the client.
        let (hello, got) = answer(SECRET, SERVER, &challenge(&ns), &nc).expect("answered");
        assert_eq!(got, ns);
        let hello_frame = frame(0, method::HELLO, hello.encode_to_vec());
        let welcome = check_hello(SECRET, &ns, &names, &hello_frame).expect("accepted");
        let ok = frame(0, status::OK, welcome.encode_to_vec());
        check_welcome(SECRET, &hello, &ns, &ok).expect("the server proved it");
        // A relay's address: the same secret, the real challenge, refused.
        let (relayed, _) =
            answer(SECRET, "127.0.0.1:7777", &challenge(&ns), &nc).expect("answered");
        let relayed = frame(0, method::HELLO, relayed.encode_to_vec());
        assert!(check_hello(SECRET, &ns, &names, &relayed).is_err());
        // Lying about the address breaks the proof.
        let mut lying = hello.clone();
        lying.server = "127.0.0.1:7777".into();
        let lying_frame = frame(0, method::HELLO, lying.encode_to_vec());
        assert!(check_hello(SECRET, &ns, &[identity("127.0.0.1:7777")], &lying_frame).is_err());
        // A server without the secret cannot answer the client.
        let forged = HelloResponse {
            proof: proof(
                b"not the secret, but 32 bytes long",
                Role::Server,
                SERVER,
                &ns,
                &nc,
            ),
        };
        let forged = frame(0, status::OK, forged.encode_to_vec());
        assert!(check_welcome(SECRET, &hello, &ns, &forged).is_err());
        // Nor echo the client's own proof back.
        let echoed = HelloResponse {
            proof: hello.proof.clone(),
        };
        let echoed = frame(0, status::OK, echoed.encode_to_vec());
        assert!(check_welcome(SECRET, &hello, &ns, &echoed).is_err());
        // An empty OK (an older server) is not a proof.
        assert!(check_welcome(SECRET, &hello, &ns, &frame(0, status::OK, vec![])).is_err());
    }

    #[test]
    fn the_server_refuses_anything_but_a_valid_hello() {
        let nonce = [7u8; NONCE_BYTES];
        let names = vec![identity(SERVER)];
        let ping = frame(1, method::PING, vec![]);
        assert!(check_hello(SECRET, &nonce, &names, &ping).is_err());
        let garbage = frame(0, method::HELLO, b"\xff\xff\xff".to_vec());
        assert!(check_hello(SECRET, &nonce, &names, &garbage).is_err());
        // A v1 hello (a proof, no client nonce).
        let old = HelloRequest {
            proof: vec![0; 32],
            ..HelloRequest::default()
        };
        assert!(
            check_hello(
                SECRET,
                &nonce,
                &names,
                &frame(0, method::HELLO, old.encode_to_vec())
            )
            .is_err()
        );
    }

    #[test]
    fn the_client_answers_only_a_challenge_and_addresses_are_canonical() {
        let goaway = frame(0, status::GOAWAY, vec![]);
        assert!(answer(SECRET, SERVER, &goaway, &[1; 32]).is_err());
        assert_eq!(identity("[::ffff:127.0.0.1]:8888"), "127.0.0.1:8888");
        assert_eq!(identity(" [::1]:80 "), "[::1]:80");
        assert_eq!(identity("rpc-1.internal:8888"), "rpc-1.internal:8888");
    }
}
