//! The stable-Rust stand-in for the fuzz target (`fuzz/`, nightly): a few
//! seconds of seeded random bytes and of mutated valid frames through the
//! same decoders, so every test run exercises them. Nothing may panic, and
//! a frame is never read past its announced length or over the limit.

use std::time::{Duration, Instant};

use token_agent_proto::{decode, encode_frame, read_frame, FrameError, Request, MAX_REQUEST_LEN};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let requests = [
        r#"{"op":"hello","version":1}"#,
        r#"{"op":"ping"}"#,
        r#"{"op":"get","name":"work","min_valid_secs":30}"#,
        r#"{"op":"import","name":"w","issuer":"https://i","client_id":"c","refresh_token":"r","scopes":["openid"],"client_auth":"post","client_secret":"s","expires_in":3,"replace":true}"#,
        r#"{"op":"remove","name":"x"}"#,
        r#"{"op":"status","name":"a"}"#,
        r#"{"op":"lock","passphrase":"p"}"#,
    ];
    requests
        .iter()
        .map(|body| {
            let request: Request = serde_json::from_str(body).unwrap();
            encode_frame(&request, MAX_REQUEST_LEN).unwrap()
        })
        .collect()
}

fn mutate(rng: &mut XorShift, input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] = rng.next() as u8;
            }
            1 if !input.is_empty() => {
                let at = rng.below(input.len());
                input.remove(at);
            }
            2 => {
                let at = rng.below(input.len() + 1);
                input.insert(at, b"{}[]\":,\\0e-1nul"[rng.below(15)]);
            }
            3 if !input.is_empty() => {
                let at = rng.below(input.len());
                input.truncate(at);
            }
            _ => {
                let at = rng.below(input.len() + 1);
                let copy = input[..at].to_vec();
                input.extend_from_slice(&copy);
            }
        }
    }
}

fn check(input: &[u8]) {
    let _ = decode::<Request>(input);
    let mut reader = input;
    loop {
        let before = reader.len();
        match read_frame::<_, Request>(&mut reader, MAX_REQUEST_LEN) {
            Ok(_) | Err(FrameError::Malformed(_)) => {
                assert!(reader.len() < before, "a frame was read without consuming");
            }
            Err(FrameError::TooLarge(len)) => {
                assert!(len > MAX_REQUEST_LEN);
                break;
            }
            Err(FrameError::Io(_)) => break,
        }
    }
}

#[test]
fn random_and_mutated_frames_never_panic_the_decoders() {
    let budget = std::env::var("TOKEN_AGENT_DECODE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(3), Duration::from_secs);
    let mut rng = XorShift(0x005e_ed0f_70ca_a9e7);
    let seeds = seeds();
    let started = Instant::now();
    let mut inputs = 0u64;
    while started.elapsed() < budget {
        let input = if rng.below(4) == 0 {
            let len = rng.below(512);
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let mut input = seeds[rng.below(seeds.len())].clone();
            mutate(&mut rng, &mut input);
            input
        };
        check(&input);
        inputs += 1;
    }
    println!("{inputs} inputs decoded in {:?}", started.elapsed());
    assert!(inputs > 1_000);
}
