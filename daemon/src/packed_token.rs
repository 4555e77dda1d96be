//! Access tokens as the agent holds them in memory: JWT-shaped tokens
//! (base64url parts joined by dots) are kept decoded, a quarter smaller.
//!
//! An agent with 100,000 sessions holds 100,000 access tokens, most of its
//! memory; a Keycloak or Entra token is a JWT of a kilobyte or more, and its
//! text is base64url, 4 characters for every 3 bytes. Decoding is exact both
//! ways here: the engine refuses padding and stray trailing bits, so a part
//! that decodes has exactly one encoding, and the text served is the text
//! received, byte for byte. Anything else (opaque tokens with other
//! characters, very long parts) is kept as text.
//!
//! Packed layout: `[parts: u8][decoded length of each part: u16 LE]...[bytes]`;
//! `parts == 0` means the rest is the token's text as it came.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::de::Visitor;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use token_agent_proto::Secret;
use zeroize::Zeroizing;

/// Most parts a packed token may have (a JWE has five).
const MAX_PARTS: usize = 8;

/// Below this, a token is kept as text: the header would eat the gain.
const MIN_PACKED_LEN: usize = 32;

/// An access token, packed, wiped when dropped. Compares equal exactly
/// when the texts do.
#[derive(Clone, PartialEq, Eq)]
pub struct PackedToken(Zeroizing<Box<[u8]>>);

impl PackedToken {
    pub fn new(token: &Secret) -> PackedToken {
        PackedToken::from_text(token.expose())
    }

    fn from_text(text: &str) -> PackedToken {
        PackedToken(Zeroizing::new(pack(text).unwrap_or_else(|| as_text(text))))
    }

    /// The token's text, as it came from the provider.
    pub fn to_secret(&self) -> Secret {
        let parts = self.0[0] as usize;
        if parts == 0 {
            let text = std::str::from_utf8(&self.0[1..]).expect("held as text from a str");
            return Secret::new(text);
        }

        let (lengths, mut bytes) = self.0[1..].split_at(2 * parts);
        let part_lengths = lengths
            .chunks_exact(2)
            .map(|pair| u16::from_le_bytes([pair[0], pair[1]]) as usize);
        let text_len: usize = part_lengths
            .clone()
            .map(|len| base64::encoded_len(len, false).expect("a u16 length encodes"))
            .sum::<usize>()
            + parts
            - 1;

        // Exactly sized, so encoding never reallocates and leaves no copy
        // of the token behind in freed memory.
        let mut text = String::with_capacity(text_len);
        for (i, len) in part_lengths.enumerate() {
            if i > 0 {
                text.push('.');
            }
            let (part, rest) = bytes.split_at(len);
            URL_SAFE_NO_PAD.encode_string(part, &mut text);
            bytes = rest;
        }
        debug_assert_eq!(text.len(), text_len);
        Secret::new(text)
    }

    /// Bytes held for the token.
    #[cfg(test)]
    fn held_len(&self) -> usize {
        self.0.len()
    }
}

/// The decoded parts of `text`, or `None` when it is not base64url parts
/// joined by dots (or too short to be worth it).
fn pack(text: &str) -> Option<Box<[u8]>> {
    if text.len() < MIN_PACKED_LEN {
        return None;
    }
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() > MAX_PARTS {
        return None;
    }

    let header_len = 1 + 2 * parts.len();
    let estimate: usize = parts
        .iter()
        .map(|part| base64::decoded_len_estimate(part.len()))
        .sum();
    // Room for every part up front: decoding never reallocates, and the
    // scratch copy is wiped when dropped.
    let mut packed = Zeroizing::new(Vec::with_capacity(header_len + estimate));
    packed.push(parts.len() as u8);
    packed.resize(header_len, 0);
    for (i, part) in parts.iter().enumerate() {
        let before = packed.len();
        URL_SAFE_NO_PAD.decode_vec(part, &mut packed).ok()?;
        let len = u16::try_from(packed.len() - before).ok()?;
        packed[1 + 2 * i..3 + 2 * i].copy_from_slice(&len.to_le_bytes());
    }
    Some(Box::from(&packed[..]))
}

fn as_text(text: &str) -> Box<[u8]> {
    let mut held = Vec::with_capacity(1 + text.len());
    held.push(0);
    held.extend_from_slice(text.as_bytes());
    held.into_boxed_slice()
}

impl fmt::Debug for PackedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PackedToken(redacted)")
    }
}

/// Stored as its text, like a [`Secret`]: the store's format does not
/// change with how memory holds it.
impl Serialize for PackedToken {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_secret().serialize(serializer)
    }
}

/// Packed straight from the record's bytes where the parser can lend them:
/// loading 100,000 sessions then makes no text copy of each token to throw
/// away, which would leave the heap full of holes.
impl<'de> Deserialize<'de> for PackedToken {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(PackedTokenVisitor)
    }
}

struct PackedTokenVisitor;

impl Visitor<'_> for PackedTokenVisitor {
    type Value = PackedToken;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an access token as a string")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<PackedToken, E> {
        Ok(PackedToken::from_text(text))
    }

    fn visit_string<E: serde::de::Error>(self, text: String) -> Result<PackedToken, E> {
        // Wiped when dropped.
        let text = Secret::new(text);
        Ok(PackedToken::new(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) -> (String, usize) {
        let packed = PackedToken::new(&Secret::new(text));
        (packed.to_secret().expose().to_string(), packed.held_len())
    }

    #[test]
    fn a_jwt_is_held_a_quarter_smaller_and_served_byte_for_byte() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT","kid":"k1"}"#);
        let claims = URL_SAFE_NO_PAD.encode(vec![b'x'; 600]);
        let signature = URL_SAFE_NO_PAD.encode([0xfbu8; 256]);
        let jwt = format!("{header}.{claims}.{signature}");

        let (served, held) = round_trip(&jwt);

        assert_eq!(served, jwt);
        assert!(
            held < jwt.len() * 4 / 5,
            "{held} bytes held for {}",
            jwt.len()
        );
    }

    #[test]
    fn every_part_length_and_empty_parts_come_back_exactly() {
        for len in 0..40 {
            let part = URL_SAFE_NO_PAD.encode((0..len as u8).collect::<Vec<_>>());
            for text in [
                format!("{part}.eyJzdWIiOiJhbGljZSJ9.{part}"),
                format!("eyJhbGciOiJub25lIn0.{part}."),
                format!("{part}{part}-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_"),
            ] {
                assert_eq!(round_trip(&text).0, text);
            }
        }
    }

    #[test]
    fn text_that_is_not_canonical_base64url_is_kept_as_it_came() {
        let texts = [
            // Padding, standard alphabet, stray trailing bits, a length no
            // encoding has, spaces, other characters, too many parts.
            "eyJhbGciOiJub25lIn0=.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",
            "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.c2ln+/mF0dXJl",
            "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJm",
            "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlA",
            "eyJhbGciOiJub25lIn0 eyJzdWIiOiJhbGljZSJ9 c2lnbmF0dXJl",
            "gho_16C7e42F292c6912E7710c838347Ae178B4a~ünïcode",
            "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.u.v.w.x.y.z.0123",
            "short",
            "",
        ];
        for text in texts {
            assert_eq!(round_trip(text).0, text);
        }
    }

    #[test]
    fn a_part_too_long_for_its_length_field_is_kept_as_text() {
        let text = format!("eyJ.{}", "A".repeat(90_000));
        let (served, held) = round_trip(&text);
        assert_eq!(served, text);
        assert_eq!(held, text.len() + 1);
    }

    #[test]
    fn stored_as_its_text_and_read_back_equal() {
        let jwt = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6MX0.c2lnbmF0dXJl";
        let packed = PackedToken::new(&Secret::new(jwt));

        let json = serde_json::to_string(&packed).unwrap();
        let back: PackedToken = serde_json::from_str(&json).unwrap();

        assert_eq!(json, format!("\"{jwt}\""));
        assert_eq!(back, packed);
        assert_ne!(
            back,
            PackedToken::new(&Secret::new("another-token-of-some-length-xx"))
        );
    }

    #[test]
    fn debug_never_shows_the_token() {
        let packed = PackedToken::new(&Secret::new("opaque-token-value-that-is-secret"));
        assert!(!format!("{packed:?}").contains("secret"));
    }
}
