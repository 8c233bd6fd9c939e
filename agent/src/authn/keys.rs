//! An issuer's public keys, ready to verify with: each JWK of a JWKS turned into a decoding key
//! with its `kid` and the signature algorithms it may verify. Only asymmetric signing keys are
//! kept (RSA, EC P-256/P-384, Ed25519): a symmetric `oct` key is a shared secret, which a
//! published key set cannot be, and a key marked for encryption (`use: enc`) signs nothing.

use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse},
};

/// One usable key.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    /// The algorithms this key verifies: its `alg` if the JWK names one, else every signature
    /// algorithm of its type.
    pub algorithms: Vec<Algorithm>,
    pub key: DecodingKey,
}

/// The usable keys of one JWKS.
#[derive(Clone, Default)]
pub struct KeySet {
    pub keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (&k.kid, &k.algorithms)))
            .finish()
    }
}

impl KeySet {
    /// The usable keys of `set` (the others are skipped).
    pub fn from_jwks(set: &JwkSet) -> Self {
        Self {
            keys: set.keys.iter().filter_map(key).collect(),
        }
    }

    /// Parse a JWKS document: an error if it is not one, or has no usable key.
    pub fn parse(text: &str) -> Result<(JwkSet, Self), String> {
        let set: JwkSet =
            serde_json::from_str(text).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
        let keys = Self::from_jwks(&set);
        if keys.keys.is_empty() {
            return Err(format!(
                "no usable public key among its {} (RSA, EC P-256/P-384 or Ed25519 signing \
                 keys; symmetric `oct` keys are refused: a shared secret cannot be published)",
                set.keys.len()
            ));
        }
        Ok((set, keys))
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

fn key(jwk: &Jwk) -> Option<Key> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let of_type: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            _ => return None,
        },
        // Symmetric (`oct`) and unknown key types.
        _ => return None,
    };
    let algorithms = match &jwk.common.key_algorithm {
        None => of_type.to_vec(),
        Some(named) => {
            let named = signature_algorithm(named)?;
            if !of_type.contains(&named) {
                return None;
            }
            vec![named]
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key {
        kid: jwk.common.key_id.clone(),
        algorithms,
        key,
    })
}

/// The asymmetric signature algorithm a JWK's `alg` names, if it names one.
fn signature_algorithm(alg: &KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}
