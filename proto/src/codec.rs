//! The gRPC codec of every service here: prost, with one guard before a
//! message is decoded.
//!
//! Decoding allocates per field: an empty `repeated string` entry costs two
//! bytes on the wire and a 24-byte `String` in memory, so 64 MiB of empty
//! keys would become ~770 MiB before a handler could refuse the batch. The
//! decoder first walks the message's top-level fields (no allocation) and
//! refuses one with more than [`set_max_fields_per_message`] allows with
//! `RESOURCE_EXHAUSTED`. Together with a decode limit in bytes derived
//! from the request limits, a request's memory is bounded by its size.

use std::{
    marker::PhantomData,
    sync::atomic::{AtomicUsize, Ordering},
};

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstEncoder};

static MAX_FIELDS: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Bounds the top-level fields of every message this process decodes (a
/// server sets it from its batch limit, plus room for the other fields).
/// Unbounded until called.
pub fn set_max_fields_per_message(max: usize) {
    MAX_FIELDS.store(max.max(1), Ordering::Relaxed);
}

/// The number of top-level fields in an encoded message, or `None` once it
/// passes `max` or the bytes are not protobuf (prost then says why).
pub fn count_fields(mut bytes: &[u8], max: usize) -> Option<usize> {
    let mut n = 0usize;
    while !bytes.is_empty() {
        let key = prost::encoding::decode_varint(&mut bytes).ok()?;
        let skip = match key & 7 {
            0 => {
                prost::encoding::decode_varint(&mut bytes).ok()?;
                0
            }
            1 => 8,
            2 => usize::try_from(prost::encoding::decode_varint(&mut bytes).ok()?).ok()?,
            5 => 4,
            _ => return None,
        };
        bytes = bytes.get(skip..)?;
        n += 1;
        if n > max {
            return None;
        }
    }
    Some(n)
}

/// [`ProstCodec`] with the field guard on decoding.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(PhantomData)
    }
}

#[derive(Debug, Clone)]
pub struct BoundedDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use bytes::Buf;
        let max = MAX_FIELDS.load(Ordering::Relaxed);
        // A decode buffer is one contiguous chunk; were it not, skip the
        // guard rather than copy.
        if max != usize::MAX && buf.chunk().len() == buf.remaining() {
            let chunk = buf.chunk();
            if count_fields(chunk, max).is_none() && count_fields(chunk, usize::MAX).is_some() {
                return Err(Status::resource_exhausted(format!(
                    "the message has more than {max} fields; split the batch (--max-batch-keys)"
                )));
            }
        }
        U::decode(buf).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embark::v1::LookupRequest;

    #[test]
    fn fields_are_counted_without_decoding() {
        let req = LookupRequest { model: "m".into(), keys: vec![String::new(); 1000], ..Default::default() };
        let bytes = req.encode_to_vec();
        assert_eq!(count_fields(&bytes, usize::MAX), Some(1001));
        assert_eq!(count_fields(&bytes, 1000), None);
        assert_eq!(count_fields(&bytes, 1001), Some(1001));
        assert_eq!(count_fields(&[0x0a, 0x05, b'a'], usize::MAX), None, "a length past the end");
    }
}
