//! The wire contracts shared by every EmbArk component.
//!
//! - [`embark::v1`]: the cache front rankers call (`Lookup`, `Models`,
//!   `Invalidate`, `Similar`).
//! - [`retina::v1`]: the embedding worker (`Embed`, `Models`).
//! - [`internal::v1`]: what EmbArk's processes send each other and no
//!   client sees: the [`internal::v1::MissEvent`] queued for unknown keys,
//!   dead letters, invalidations across replicas.
//! - [`codec`]: the services' codec: prost behind a field-count guard.
//! - [`lookup_response`]: `embark.v1.LookupResponse` by hand, to send an
//!   answer's rows from where they are (one copy, into the encode buffer).
//! - [`vectors`]: the row types a Lookup answers in (float32, float16,
//!   bfloat16, int8 with a per-row scale) and their conversions.
//! - [`EMBARK_DESCRIPTOR_SET`], [`RETINA_DESCRIPTOR_SET`]: compiled descriptors
//!   for each server's gRPC reflection.
//!
//! Vectors cross the wire as one contiguous little-endian matrix (`bytes`,
//! float32 unless the Lookup asks for another [`vectors`] type), never as
//! repeated floats: a client wraps it without a copy.

pub mod codec;
pub mod lookup_response;
pub mod vectors;

pub mod embark {
    pub mod v1 {
        tonic::include_proto!("embark.v1");
        pub use crate::lookup_response::LookupResponse;
    }
}

pub mod retina {
    pub mod v1 {
        tonic::include_proto!("retina.v1");
    }
}

pub mod internal {
    pub mod v1 {
        tonic::include_proto!("embark.internal.v1");
    }
}

/// Encoded `FileDescriptorSet` of `embark.v1`, for the front's reflection.
pub const EMBARK_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/embark_descriptors.bin"));

/// Encoded `FileDescriptorSet` of `retina.v1`, for Retina's reflection.
pub const RETINA_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/retina_descriptors.bin"));

/// Appends `rows` as little-endian float32 to a response matrix.
///
/// The wire format is little-endian; on a little-endian host this is one
/// `memcpy`, elsewhere each value is converted.
pub fn extend_le_f32(out: &mut Vec<u8>, rows: &[f32]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(rows));
    } else {
        for v in rows {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Reads a little-endian float32 matrix back into values (clients, tests).
/// Returns `None` when the length is not a multiple of 4.
pub fn f32_from_le(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Milliseconds since the Unix epoch: the clock of every `*_unix_ms` field
/// in these contracts. A clock before 1970 reads as 0.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The model name and version of a [`model_namespace`] (an empty version
/// for the bare name), e.g. for metric labels.
pub fn split_namespace(namespace: &str) -> (&str, &str) {
    namespace.split_once(VERSION_SEPARATOR).unwrap_or((namespace, ""))
}

/// What separates a model's name from its version in a [`model_namespace`].
/// Catalogue names cannot contain it.
pub const VERSION_SEPARATOR: char = '@';

/// Where the rows of `model` at `version` live (the store's model column,
/// the tier's and the miss topic's keys): `model@version`, so vectors of
/// two versions never share a row, and a version's rows are scanned,
/// counted and retired apart. An empty version names the unversioned rows
/// of releases before versions.
pub fn model_namespace(model: &str, version: &str) -> String {
    if version.is_empty() {
        return model.to_owned();
    }
    let mut out = String::with_capacity(model.len() + 1 + version.len());
    out.push_str(model);
    out.push(VERSION_SEPARATOR);
    out.push_str(version);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds(set: &[u8], name: &str) -> bool {
        set.windows(name.len()).any(|w| w == name.as_bytes())
    }

    /// The internal messages (misses, dead letters, invalidations) sat in
    /// `embark.v1`, so the front's reflection listed them as its API.
    #[test]
    fn reflection_lists_only_the_served_api() {
        assert!(holds(EMBARK_DESCRIPTOR_SET, "embark.v1"));
        assert!(holds(RETINA_DESCRIPTOR_SET, "retina.v1"));
        for set in [EMBARK_DESCRIPTOR_SET, RETINA_DESCRIPTOR_SET] {
            for internal in ["embark.internal", "MissEvent", "DeadLetter", "InvalidationEvent"] {
                assert!(!holds(set, internal), "{internal} is in a server's reflection");
            }
        }
    }

    #[test]
    fn the_internal_messages_keep_their_wire_format() {
        use prost::Message as _;
        // Field numbers are the contract on the topics: a MissEvent written
        // before the package moved decodes the same.
        let e = internal::v1::MissEvent { model: "m".into(), key: "k".into(), attempts: 3, ..Default::default() };
        assert_eq!(e.encode_to_vec(), [0x0a, 1, b'm', 0x12, 1, b'k', 0x20, 3]);
    }

    #[test]
    fn a_version_has_its_own_namespace_an_empty_one_is_the_bare_name() {
        assert_eq!(super::model_namespace("m", "2"), "m@2");
        assert_eq!(super::model_namespace("m", ""), "m");
        assert_ne!(super::model_namespace("m", "1"), super::model_namespace("m", "2"));
        assert_eq!(super::split_namespace("m@a@b"), ("m", "a@b"));
        assert_eq!(super::split_namespace("m"), ("m", ""));
    }
}
