//! Signing secrets and signatures, per the Standard Webhooks specification
//! (`standardwebhooks` makes the signature): a receiver verifies with that
//! library, or Svix's, unchanged.

use base64::Engine;
use rand::RngCore;

/// What every secret starts with: the specification's prefix, which the
/// libraries strip before decoding.
pub const SECRET_PREFIX: &str = "whsec_";

/// A new signing secret: `whsec_` and the base64 of 32 random bytes (the
/// HMAC-SHA256 key), from the thread's CSPRNG (ChaCha, seeded by the
/// operating system).
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// The `webhook-signature` header: one `v1,<base64>` per secret, separated
/// by spaces (during a rotation's grace period, the new secret's and the
/// previous one's, so a receiver with either verifies).
pub fn signature_header(
    secrets: &[&str],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, String> {
    let mut signatures = Vec::with_capacity(secrets.len());
    for secret in secrets {
        let signer = standardwebhooks::Webhook::new(secret)
            .map_err(|_| "a stored signing secret is not base64".to_string())?;
        let signature = signer
            .sign(id, timestamp, body)
            .map_err(|err| format!("cannot sign: {err}"))?;
        signatures.push(signature);
    }
    Ok(signatures.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(id: &str, timestamp: i64, signature: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("webhook-id", id.parse().unwrap());
        headers.insert("webhook-timestamp", timestamp.to_string().parse().unwrap());
        headers.insert("webhook-signature", signature.parse().unwrap());
        headers
    }

    #[test]
    fn each_secret_verifies_a_signature_made_with_both() {
        let (old, new) = (new_secret(), new_secret());
        assert!(new.starts_with(SECRET_PREFIX) && new != old);
        let now = chrono::Utc::now().timestamp();
        let body = br#"{"type":"user.metadata.updated"}"#;
        let both = signature_header(&[&new, &old], "wh_1_7", now, body).unwrap();
        assert_eq!(both.split(' ').count(), 2);
        for secret in [&old, &new] {
            let verifier = standardwebhooks::Webhook::new(secret).unwrap();
            verifier
                .verify(body, &headers("wh_1_7", now, &both))
                .unwrap();
            // Another body, id or time does not verify.
            assert!(
                verifier
                    .verify(b"{}", &headers("wh_1_7", now, &both))
                    .is_err()
            );
            assert!(
                verifier
                    .verify(body, &headers("wh_1_8", now, &both))
                    .is_err()
            );
        }
        let only_new = signature_header(&[&new], "wh_1_7", now, body).unwrap();
        let verifier = standardwebhooks::Webhook::new(&old).unwrap();
        assert!(
            verifier
                .verify(body, &headers("wh_1_7", now, &only_new))
                .is_err()
        );
    }
}
