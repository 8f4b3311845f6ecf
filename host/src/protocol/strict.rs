//! A JSON reading that refuses a key given twice anywhere in a value.
//!
//! serde_json keeps the last of two equal keys of an object it reads into a
//! map, and typed fields only catch repeats of the keys they name; a command
//! must not mean something other than what its sender may have read in it.

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};

/// Any JSON value whose objects, at every depth, name each key once.
#[derive(Debug)]
pub struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Values)
    }
}

struct Values;

impl<'de> Visitor<'de> for Values {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: Error>(self, _: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_i64<E: Error>(self, _: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_u64<E: Error>(self, _: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_f64<E: Error>(self, _: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_str<E: Error>(self, _: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_unit<E: Error>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<UniqueKeys, A::Error> {
        while items.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut fields: A) -> Result<UniqueKeys, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = fields.next_key::<String>()? {
            fields.next_value::<UniqueKeys>()?;
            if let Some(key) = seen.replace(key) {
                return Err(A::Error::custom(format!("the key `{key}` is given twice")));
            }
        }
        Ok(UniqueKeys)
    }
}

#[cfg(test)]
mod tests {
    use super::UniqueKeys;

    #[test]
    fn a_key_given_twice_at_any_depth_is_refused() {
        for good in [
            r#"{"a":1,"b":{"a":2,"c":[{"a":3},{"a":4}]}}"#,
            "[1,\"x\",null,true]",
        ] {
            assert!(serde_json::from_str::<UniqueKeys>(good).is_ok(), "{good}");
        }
        for bad in [
            r#"{"a":1,"a":2}"#,
            r#"{"p":{"x":1,"x":2}}"#,
            r#"{"p":[{"q":{"r":1,"r":1}}]}"#,
        ] {
            let err = serde_json::from_str::<UniqueKeys>(bad).expect_err(bad);
            assert!(err.to_string().contains("given twice"), "{err}");
        }
    }
}
