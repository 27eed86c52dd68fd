//! Standard Webhooks signing (<https://www.standardwebhooks.com>), shared by the relay's HTTP
//! sink (which signs) and the inbox's webhook receiver (which verifies).
//!
//! The scheme: a secret is `whsec_` followed by base64 of 24 to 64 random bytes. A request
//! carries `webhook-id` (the Tidings message id, stable across retries), `webhook-timestamp`
//! (Unix seconds of this attempt) and `webhook-signature`: space-separated `v1,<base64>`
//! entries, one per secret, each `HMAC-SHA256(secret, "{id}.{timestamp}.{body}")`. Several
//! secrets sign at once while a secret is rotated; a receiver accepts a request when any entry
//! matches any of its secrets.
//!
//! The Standard Webhooks signature covers the body only, not the headers. Tidings' metadata
//! headers (`Tidings-Topic`, `Tidings-Key`, `Tidings-Biz-Id`, `Tidings-Created-At`) decide what
//! a receiver's inbox deduplicates on, so they are signed too, by [`TIDINGS_SIGNATURE`]: HMAC-SHA256
//! with the same secrets over `"tidings-metadata-v1.{id}.{timestamp}.{topic}\n{key}\n{biz-id}\n{created-at}"`
//! (an absent one as the empty string; the schema refuses empty values and control characters
//! in all four, so the text is unambiguous). Without it, whoever could replay a captured
//! request could change its biz-id and have the effect run twice.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The message id header (the Tidings message id).
pub const WEBHOOK_ID: &str = "webhook-id";
/// Unix seconds when this attempt was signed.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// `v1,<base64>` signatures, space-separated.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
/// The same message id, for receivers that deduplicate by the IETF draft's header.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// Signatures of Tidings' metadata headers (see the module documentation).
pub const TIDINGS_SIGNATURE: &str = "Tidings-Signature";
/// The receiver's default tolerance for `webhook-timestamp` (the specification's 5 minutes).
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

const PREFIX: &str = "whsec_";

/// A signing secret (`whsec_...`). Its bytes are never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a secret, or a signed request, was refused. The text never repeats a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// A secret that is not `whsec_` + base64 of 24 to 64 bytes.
    #[error("{0}")]
    BadSecret(String),
    /// A required header is missing or empty.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// `webhook-timestamp` is not a number of seconds.
    #[error("webhook-timestamp is not a Unix time in seconds")]
    BadTimestamp,
    /// `webhook-timestamp` is further from now than the tolerance (a replay, or a clock off).
    #[error("webhook-timestamp is {0} s away from now, more than the tolerance of {1} s")]
    OutsideTolerance(i64, i64),
    /// No signature matches any secret.
    #[error("no signature in {0} matches")]
    NoMatch(&'static str),
}

impl Secret {
    /// Parses `whsec_<base64>` (24 to 64 bytes once decoded; standard base64, padding optional).
    pub fn parse(s: &str) -> Result<Secret, SignatureError> {
        let s = s.trim();
        let Some(b64) = s.strip_prefix(PREFIX) else {
            return Err(SignatureError::BadSecret(
                "a webhook secret starts with whsec_ (then base64 of 24 to 64 random bytes)".into(),
            ));
        };
        let key = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(b64.trim_end_matches('='))
            .map_err(|_| {
                SignatureError::BadSecret("a webhook secret after whsec_ must be base64".into())
            })?;
        if !(24..=64).contains(&key.len()) {
            return Err(SignatureError::BadSecret(format!(
                "a webhook secret must hold 24 to 64 bytes, this one holds {}",
                key.len()
            )));
        }
        Ok(Secret { key })
    }

    /// A fresh random secret of 32 bytes, as `whsec_...` text (for tests and demos).
    pub fn generate() -> String {
        let bytes: [u8; 32] = rand::random();
        format!("{PREFIX}{}", STANDARD.encode(bytes))
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }
}

/// `webhook-signature`: one `v1,<base64>` per secret, space-separated.
pub fn sign(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    join(secrets, &[id.as_bytes(), b".", ts.as_bytes(), b".", body])
}

/// The text [`TIDINGS_SIGNATURE`] signs after `"{id}.{timestamp}."`.
pub fn metadata_text(
    topic: &str,
    key: Option<&str>,
    biz_id: Option<&str>,
    created_at: Option<&str>,
) -> String {
    format!(
        "{topic}\n{}\n{}\n{}",
        key.unwrap_or(""),
        biz_id.unwrap_or(""),
        created_at.unwrap_or("")
    )
}

/// `Tidings-Signature`: the metadata headers signed like the body, but over
/// `"tidings-metadata-v1.{id}.{timestamp}.{metadata}"`: the prefix keeps a metadata signature
/// from passing as a `webhook-signature` of a request whose body is the metadata text (a
/// Standard Webhooks verifier would read the prefix as the id and the message id as the
/// timestamp, which is not a number).
pub fn sign_metadata(secrets: &[Secret], id: &str, timestamp: i64, metadata: &str) -> String {
    let ts = timestamp.to_string();
    join(
        secrets,
        &[
            METADATA_DOMAIN.as_bytes(),
            b".",
            id.as_bytes(),
            b".",
            ts.as_bytes(),
            b".",
            metadata.as_bytes(),
        ],
    )
}

/// Checks `Tidings-Signature` (see [`sign_metadata`]).
pub fn verify_metadata(
    secrets: &[Secret],
    header: &str,
    id: &str,
    timestamp: i64,
    metadata: &str,
) -> Result<(), SignatureError> {
    let ts = timestamp.to_string();
    verify_parts(
        secrets,
        header,
        TIDINGS_SIGNATURE,
        &[
            METADATA_DOMAIN.as_bytes(),
            b".",
            id.as_bytes(),
            b".",
            ts.as_bytes(),
            b".",
            metadata.as_bytes(),
        ],
    )
}

/// What [`sign_metadata`] puts first.
pub const METADATA_DOMAIN: &str = "tidings-metadata-v1";

/// At most this many entries of a signature header are looked at (one per secret being
/// rotated is the use; thousands are an attack on the receiver's CPU).
pub const MAX_SIGNATURES: usize = 16;

fn join(secrets: &[Secret], parts: &[&[u8]]) -> String {
    let mut out = String::new();
    for s in secrets {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("v1,");
        out.push_str(&STANDARD.encode(s.mac(parts)));
    }
    out
}

/// Checks `webhook-timestamp` against `now` (Unix seconds) and returns it.
pub fn check_timestamp(header: &str, now: i64, tolerance_secs: i64) -> Result<i64, SignatureError> {
    let ts: i64 = header
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let off = now.saturating_sub(ts);
    if off.saturating_abs() > tolerance_secs {
        return Err(SignatureError::OutsideTolerance(off, tolerance_secs));
    }
    Ok(ts)
}

/// Whether any `v1` entry of `header` is the signature of `"{id}.{timestamp}."` followed by
/// `rest` under any of `secrets`, compared in constant time. Each secret's MAC is computed
/// once, however many entries the header has; at most [`MAX_SIGNATURES`] entries are read.
pub fn verify(
    secrets: &[Secret],
    header: &str,
    header_name: &'static str,
    id: &str,
    timestamp: i64,
    rest: &[u8],
) -> Result<(), SignatureError> {
    let ts = timestamp.to_string();
    verify_parts(
        secrets,
        header,
        header_name,
        &[id.as_bytes(), b".", ts.as_bytes(), b".", rest],
    )
}

fn verify_parts(
    secrets: &[Secret],
    header: &str,
    header_name: &'static str,
    parts: &[&[u8]],
) -> Result<(), SignatureError> {
    let given: Vec<[u8; 32]> = header
        .split(' ')
        .take(MAX_SIGNATURES)
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter(|b64| b64.len() == 44)
        .filter_map(|b64| STANDARD.decode(b64).ok())
        .filter_map(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .collect();
    if given.is_empty() {
        return Err(SignatureError::NoMatch(header_name));
    }
    let mut matched = false;
    for s in secrets {
        let expected = s.mac(parts);
        for g in &given {
            // Constant time: every byte is compared whatever the first difference.
            let diff = expected
                .iter()
                .zip(g)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            matched |= diff == 0;
        }
    }
    if matched {
        Ok(())
    } else {
        Err(SignatureError::NoMatch(header_name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification (and of the reference libraries'
    /// tests): this secret, id, timestamp and body give this signature.
    #[test]
    fn the_specifications_test_vector() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            std::slice::from_ref(&secret),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        verify(
            &[secret],
            &sig,
            WEBHOOK_SIGNATURE,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
    }

    #[test]
    fn rotation_signs_with_every_secret_and_verifies_with_any() {
        let (old, new) = (
            Secret::parse(&Secret::generate()).unwrap(),
            Secret::parse(&Secret::generate()).unwrap(),
        );
        let sig = sign(&[old.clone(), new.clone()], "id", 7, b"body");
        assert_eq!(sig.split(' ').count(), 2);
        verify(
            std::slice::from_ref(&new),
            &sig,
            WEBHOOK_SIGNATURE,
            "id",
            7,
            b"body",
        )
        .unwrap();
        verify(
            std::slice::from_ref(&old),
            &sig,
            WEBHOOK_SIGNATURE,
            "id",
            7,
            b"body",
        )
        .unwrap();
        let other = Secret::parse(&Secret::generate()).unwrap();
        assert_eq!(
            verify(&[other], &sig, WEBHOOK_SIGNATURE, "id", 7, b"body"),
            Err(SignatureError::NoMatch(WEBHOOK_SIGNATURE))
        );
        // Any change to id, time or body breaks it.
        assert!(verify(
            std::slice::from_ref(&new),
            &sig,
            WEBHOOK_SIGNATURE,
            "id2",
            7,
            b"body"
        )
        .is_err());
        assert!(verify(
            std::slice::from_ref(&new),
            &sig,
            WEBHOOK_SIGNATURE,
            "id",
            8,
            b"body"
        )
        .is_err());
        assert!(verify(&[new], &sig, WEBHOOK_SIGNATURE, "id", 7, b"bodY").is_err());
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        for bad in [
            "",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_***",
            "whsec_c2hvcnQ=",
        ] {
            let e = Secret::parse(bad).unwrap_err();
            assert!(!e.to_string().contains("MfKQ"), "{e}");
        }
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        // Padding is optional.
        Secret::parse(&Secret::generate()).unwrap();
        Secret::parse(Secret::generate().trim_end_matches('=')).unwrap();
    }

    #[test]
    fn timestamps_outside_the_tolerance_are_refused() {
        assert_eq!(check_timestamp("1000", 1000, 300), Ok(1000));
        assert_eq!(check_timestamp("700", 1000, 300), Ok(700));
        assert_eq!(
            check_timestamp("699", 1000, 300),
            Err(SignatureError::OutsideTolerance(301, 300))
        );
        assert_eq!(
            check_timestamp("1301", 1000, 300),
            Err(SignatureError::OutsideTolerance(-301, 300))
        );
        assert_eq!(
            check_timestamp("x", 1000, 300),
            Err(SignatureError::BadTimestamp)
        );
        assert!(check_timestamp("-9223372036854775808", 1000, 300).is_err());
    }

    #[test]
    fn a_metadata_signature_is_no_body_signature() {
        let k = vec![Secret::parse(&Secret::generate()).unwrap()];
        let meta = metadata_text("t", Some("k"), Some("b"), None);
        let sig = sign_metadata(&k, "id", 7, &meta);
        verify_metadata(&k, &sig, "id", 7, &meta).unwrap();
        assert!(verify(&k, &sig, WEBHOOK_SIGNATURE, "id", 7, meta.as_bytes()).is_err());
        assert!(verify_metadata(&k, &sign(&k, "id", 7, meta.as_bytes()), "id", 7, &meta).is_err());
    }

    #[test]
    fn only_the_first_entries_of_a_signature_header_are_read() {
        let k = vec![Secret::parse(&Secret::generate()).unwrap()];
        let good = sign(&k, "id", 7, b"body");
        let junk = vec!["v1,"; 10_000].join(" ");
        assert!(verify(
            &k,
            &format!("{junk} {good}"),
            WEBHOOK_SIGNATURE,
            "id",
            7,
            b"body"
        )
        .is_err());
        let few = vec!["v1,AAAA"; MAX_SIGNATURES - 1].join(" ");
        verify(
            &k,
            &format!("{few} {good}"),
            WEBHOOK_SIGNATURE,
            "id",
            7,
            b"body",
        )
        .unwrap();
    }
}
