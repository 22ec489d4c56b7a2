//! Backend API keys: configured as `name:sha256-hex` entries, so the keys
//! themselves never sit in configuration, and compared in constant time.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

#[derive(Clone)]
struct ApiKey {
    name: Arc<str>,
    hash: [u8; 32],
}

/// The SHA-256 of a key, in the lowercase hex an entry holds.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl ApiKeys {
    /// Parses entries separated by newlines or commas; blank lines and lines
    /// starting with `#` are ignored. `source` names the origin in errors.
    pub fn parse(text: &str, source: &str) -> Result<ApiKeys, String> {
        let mut keys = ApiKeys::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            for entry in line.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let at = format!("{source} line {}", number + 1);
                keys.add(parse_entry(entry).map_err(|e| format!("{at}: {e}"))?)
                    .map_err(|e| format!("{at}: {e}"))?;
            }
        }
        Ok(keys)
    }

    /// Adds the entries of `other`; a name may appear only once overall.
    pub fn extend(&mut self, other: ApiKeys) -> Result<(), String> {
        other.keys.into_iter().try_for_each(|key| self.add(key))
    }

    fn add(&mut self, key: ApiKey) -> Result<(), String> {
        if self.keys.iter().any(|k| k.name == key.name) {
            return Err(format!("API key name {:?} appears twice", &*key.name));
        }
        self.keys.push(key);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The name of the entry whose hash matches `key`. Every entry is
    /// compared, in constant time, whether or not one matched earlier.
    pub fn find(&self, key: &str) -> Option<Arc<str>> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for entry in &self.keys {
            if bool::from(entry.hash.ct_eq(&digest)) {
                found = Some(entry.name.clone());
            }
        }
        found
    }
}

fn parse_entry(entry: &str) -> Result<ApiKey, String> {
    let (name, hash) = entry.split_once(':').ok_or("expected `name:sha256-hex`")?;
    let name = name.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(format!(
            "API key name {name:?} must be non-empty letters, digits, '-', '_', '.' or '@'"
        ));
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hash.trim(), &mut bytes).map_err(|_| {
        format!(
            "the hash of API key {name:?} must be 64 hex digits (the SHA-256 of the key, not the key)"
        )
    })?;
    Ok(ApiKey {
        name: name.into(),
        hash: bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_hex() {
        // printf %s abc | sha256sum
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn parses_lines_commas_and_comments() {
        let text = format!(
            "# backend services\n billing:{}\n\nsearch:{}, crm:{}\n",
            hash_key("k1"),
            hash_key("k2"),
            hash_key("k3").to_uppercase()
        );
        let keys = ApiKeys::parse(&text, "keys.txt").unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.find("k1").as_deref(), Some("billing"));
        assert_eq!(keys.find("k2").as_deref(), Some("search"));
        assert_eq!(keys.find("k3").as_deref(), Some("crm"));
        assert_eq!(keys.find("k4"), None);
        assert_eq!(keys.find(&hash_key("k1")), None, "the hash is not the key");
    }

    #[test]
    fn rejects_bad_entries_with_their_line() {
        let err = ApiKeys::parse("billing:abc", "keys.txt").err().unwrap();
        assert!(err.starts_with("keys.txt line 1:"), "{err}");
        assert!(err.contains("64 hex digits"), "{err}");
        let err = ApiKeys::parse(&format!("\nno-colon{}", hash_key("x")), "env")
            .err()
            .unwrap();
        assert!(err.starts_with("env line 2:"), "{err}");
        let err = ApiKeys::parse(&format!("bad name:{}", hash_key("x")), "env")
            .err()
            .unwrap();
        assert!(err.contains("\"bad name\""), "{err}");
    }

    #[test]
    fn names_are_unique() {
        let one = ApiKeys::parse(&format!("a:{}", hash_key("1")), "file").unwrap();
        let two = ApiKeys::parse(&format!("a:{}", hash_key("2")), "env").unwrap();
        let mut all = one.clone();
        assert!(all.extend(two).unwrap_err().contains("appears twice"));
        let dup = format!("a:{},a:{}", hash_key("1"), hash_key("2"));
        assert!(ApiKeys::parse(&dup, "env").is_err());
    }
}
