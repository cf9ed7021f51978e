//! bincode decoding that never allocates more than the input holds.
//!
//! bincode 2.0.1 decodes an owned string or byte buffer by allocating the length the input
//! claims and only then reading it, so one forged length in a state body reserves terabytes or
//! aborts the process. Its only guard, a byte limit, is a compile-time constant, and it made
//! decoding the codec benchmark's state about 15% slower when tried. Its borrowed decoding, on
//! the other hand, checks the length against the bytes actually left before touching memory.
//!
//! [`decode`] therefore runs the state's `Deserialize` through [`Bounded`], which forwards
//! every request to bincode unchanged except `deserialize_string` and `deserialize_byte_buf`:
//! those are served by borrowing from the body and handing the visitor an owned copy of exactly
//! the bytes that exist, which is what bincode would have handed it. Nested deserializers (in
//! sequences, maps, options, enums) are wrapped too, so the rule holds at every depth.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{
    DeserializeOwned, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};

/// Decodes `T` from a bincode body written with `bincode::config::standard()`, returning it
/// and the number of bytes it used.
pub(super) fn decode<T: DeserializeOwned>(
    body: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    bincode::serde::seed_decode_from_slice(
        Bounded(PhantomData::<T>),
        body,
        bincode::config::standard(),
    )
}

/// Wraps each serde role (deserializer, visitor, seed, sequence, map and enum access) so that
/// everything reached through it is wrapped as well.
struct Bounded<T>(T);

/// Serves a `deserialize_string` request from a borrowed `&str`.
struct IntoString<V>(V);

/// Serves a `deserialize_byte_buf` request from borrowed bytes.
struct IntoByteBuf<V>(V);

macro_rules! forward_deserialize {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.0.$method(Bounded(visitor))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Bounded<D> {
    type Error = D::Error;

    forward_deserialize! {
        deserialize_any deserialize_bool
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
        deserialize_f32 deserialize_f64 deserialize_char deserialize_str deserialize_bytes
        deserialize_option deserialize_unit deserialize_seq deserialize_map
        deserialize_identifier deserialize_ignored_any
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_str(IntoString(visitor))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_bytes(IntoByteBuf(visitor))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_unit_struct(name, Bounded(visitor))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_newtype_struct(name, Bounded(visitor))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple(len, Bounded(visitor))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple_struct(name, len, Bounded(visitor))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_struct(name, fields, Bounded(visitor))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_enum(name, variants, Bounded(visitor))
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty))*) => {$(
        fn $method<E: serde::de::Error>(self, v: $ty) -> Result<Self::Value, E> {
            self.0.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Bounded<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    forward_visit! {
        visit_bool(bool)
        visit_i8(i8) visit_i16(i16) visit_i32(i32) visit_i64(i64) visit_i128(i128)
        visit_u8(u8) visit_u16(u16) visit_u32(u32) visit_u64(u64) visit_u128(u128)
        visit_f32(f32) visit_f64(f64) visit_char(char)
        visit_str(&str) visit_borrowed_str(&'de str) visit_string(String)
        visit_bytes(&[u8]) visit_borrowed_bytes(&'de [u8]) visit_byte_buf(Vec<u8>)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_none()
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.visit_some(Bounded(d))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.visit_newtype_struct(Bounded(d))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.visit_seq(Bounded(seq))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.visit_map(Bounded(map))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.0.visit_enum(Bounded(data))
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for IntoString<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.0.visit_string(v.to_owned())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        self.0.visit_string(v)
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for IntoByteBuf<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        self.0.visit_byte_buf(v.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
        self.0.visit_byte_buf(v)
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Bounded<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(Bounded(d))
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Bounded<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Bounded(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Bounded<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(Bounded(seed))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.0.next_value_seed(Bounded(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Bounded<A> {
    type Error = A::Error;
    type Variant = Bounded<A::Variant>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), A::Error> {
        let (value, variant) = self.0.variant_seed(Bounded(seed))?;
        Ok((value, Bounded(variant)))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Bounded<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(Bounded(seed))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, Bounded(visitor))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.0.struct_variant(fields, Bounded(visitor))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};

    use super::*;

    /// Every shape serde has, so that a forwarding slip in [`Bounded`] shows up as a
    /// difference from plain bincode.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Unit,
        Newtype(String),
        Tuple(u8, Option<String>),
        Struct {
            bytes: Buf,
            map: BTreeMap<String, Vec<String>>,
        },
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Newtype(i128);

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct UnitStruct;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Everything {
        flag: bool,
        small: (i8, i16, i32, i64, u8, u16, u32, u64),
        wide: (Newtype, u128),
        floats: (f32, f64),
        letter: char,
        text: String,
        owned: OnlyOwned,
        bytes: Buf,
        nothing: (),
        unit: UnitStruct,
        maybe: Option<Box<Everything>>,
        shapes: Vec<Shape>,
        by_key: BTreeMap<u16, Shape>,
        fixed: [u16; 3],
    }

    /// Bytes serialized as a byte string and read back with `deserialize_byte_buf`, which only
    /// accepts an owned buffer.
    #[derive(Clone, Debug, PartialEq)]
    struct Buf(Vec<u8>);

    impl Serialize for Buf {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    impl<'de> Deserialize<'de> for Buf {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct OwnedBytes;
            impl Visitor<'_> for OwnedBytes {
                type Value = Buf;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an owned byte buffer")
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Buf, E> {
                    Ok(Buf(v))
                }
            }
            d.deserialize_byte_buf(OwnedBytes)
        }
    }

    /// A string whose visitor accepts only an owned `String`, as some hand-written ones do.
    #[derive(Clone, Debug, PartialEq, Serialize)]
    #[serde(transparent)]
    struct OnlyOwned(String);

    impl<'de> Deserialize<'de> for OnlyOwned {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Owned;
            // The misuse is the point: such visitors exist, and must keep working.
            #[allow(clippy::serde_api_misuse)]
            impl Visitor<'_> for Owned {
                type Value = OnlyOwned;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an owned string")
                }
                fn visit_string<E: serde::de::Error>(self, v: String) -> Result<OnlyOwned, E> {
                    Ok(OnlyOwned(v))
                }
            }
            d.deserialize_string(Owned)
        }
    }

    fn shapes() -> impl Strategy<Value = Shape> {
        prop_oneof![
            Just(Shape::Unit),
            ".{0,8}".prop_map(Shape::Newtype),
            (any::<u8>(), proptest::option::of(".{0,8}")).prop_map(|(a, b)| Shape::Tuple(a, b)),
            (
                prop::collection::vec(any::<u8>(), 0..16),
                prop::collection::btree_map(".{0,4}", prop::collection::vec(".{0,4}", 0..3), 0..3),
            )
                .prop_map(|(bytes, map)| Shape::Struct {
                    bytes: Buf(bytes),
                    map
                }),
        ]
    }

    fn leaf() -> impl Strategy<Value = Everything> {
        (
            any::<bool>(),
            any::<(i8, i16, i32, i64, u8, u16, u32, u64)>(),
            (any::<i128>(), any::<u128>()),
            (any::<f32>(), any::<f64>()),
            any::<char>(),
            (".{0,16}", ".{0,16}"),
            prop::collection::vec(any::<u8>(), 0..32),
            prop::collection::vec(shapes(), 0..4),
            prop::collection::btree_map(any::<u16>(), shapes(), 0..3),
            any::<[u16; 3]>(),
        )
            .prop_map(
                |(
                    flag,
                    small,
                    (a, b),
                    floats,
                    letter,
                    (text, owned),
                    bytes,
                    shapes,
                    by_key,
                    fixed,
                )| {
                    Everything {
                        flag,
                        small,
                        wide: (Newtype(a), b),
                        floats,
                        letter,
                        text,
                        owned: OnlyOwned(owned),
                        bytes: Buf(bytes),
                        nothing: (),
                        unit: UnitStruct,
                        maybe: None,
                        shapes,
                        by_key,
                        fixed,
                    }
                },
            )
    }

    fn everything() -> impl Strategy<Value = Everything> {
        (leaf(), proptest::option::of(leaf())).prop_map(|(mut outer, inner)| {
            outer.maybe = inner.map(Box::new);
            outer
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 128,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn decodes_exactly_like_bincode(value in everything()) {
            let body = bincode::serde::encode_to_vec(&value, bincode::config::standard()).unwrap();
            let (plain, plain_len): (Everything, usize) =
                bincode::serde::decode_from_slice(&body, bincode::config::standard()).unwrap();
            let (bounded, bounded_len) = decode::<Everything>(&body).unwrap();
            // NaN is not equal to itself: compare the encodings instead.
            let again = |v: &Everything| bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap();
            prop_assert_eq!(again(&bounded), again(&plain));
            prop_assert_eq!(again(&bounded), body.clone());
            prop_assert_eq!(bounded_len, plain_len);
            prop_assert_eq!(bounded_len, body.len());
        }

        #[test]
        fn damaged_bodies_error_or_decode_but_never_panic(
            value in everything(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let body = bincode::serde::encode_to_vec(&value, bincode::config::standard()).unwrap();
            let cut = cut.index(body.len());
            prop_assert!(decode::<Everything>(&body[..cut]).is_err());
            let mut flipped = body.clone();
            let bit = flip.index(body.len() * 8);
            flipped[bit / 8] ^= 1 << (bit % 8);
            let _ = decode::<Everything>(&flipped);
        }
    }

    /// A bincode varint announcing a length of 2^62.
    fn huge_length() -> Vec<u8> {
        let mut body = vec![253];
        body.extend_from_slice(&(1u64 << 62).to_le_bytes());
        body.extend_from_slice(b"only a few bytes");
        body
    }

    #[test]
    fn forged_lengths_are_not_allocated() {
        // Plain bincode would allocate 4 EiB for each of these and abort.
        for result in [
            decode::<String>(&huge_length()).map(drop),
            decode::<OnlyOwned>(&huge_length()).map(drop),
            decode::<Buf>(&huge_length()).map(drop),
            decode::<Box<str>>(&huge_length()).map(drop),
        ] {
            assert!(
                matches!(
                    result,
                    Err(bincode::error::DecodeError::UnexpectedEnd { .. })
                ),
                "{result:?}"
            );
        }
        // Sequences are preallocated by serde, which caps what it trusts a length for.
        assert!(decode::<Vec<u64>>(&huge_length()).is_err());
        assert!(decode::<BTreeMap<u8, u8>>(&huge_length()).is_err());
    }
}
