//! The cluster secret: created with the cluster, kept in a root-only file,
//! presented on every inter-node call in the `migfs-secret` metadata key and
//! checked by every server. A call without it, or with another, is refused
//! with `Unauthenticated` before any handler runs.

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Metadata key that carries the secret.
pub const KEY: &str = "migfs-secret";

/// A cluster secret (printable ASCII, checked when loaded).
#[derive(Clone)]
pub struct Secret(AsciiMetadataValue);

/// A secret that cannot travel in gRPC metadata.
#[derive(Debug, thiserror::Error)]
#[error("the cluster secret must be non-empty printable ASCII")]
pub struct BadSecret;

impl Secret {
    /// Checks and wraps a secret string (surrounding white space is dropped).
    pub fn new(s: &str) -> Result<Secret, BadSecret> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(BadSecret);
        }
        s.parse().map(Secret).map_err(|_| BadSecret)
    }

    fn matches(&self, v: &AsciiMetadataValue) -> bool {
        // Compare every byte so the time taken does not leak the prefix length.
        let (a, b) = (self.0.as_bytes(), v.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Client side: adds the secret to every request.
#[derive(Clone, Debug)]
pub struct Present(pub Secret);

impl Interceptor for Present {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(KEY, self.0.0.clone());
        Ok(req)
    }
}

/// Server side: refuses every request that does not carry the secret.
#[derive(Clone, Debug)]
pub struct Check(pub Secret);

impl Interceptor for Check {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match req.metadata().get(KEY) {
            Some(v) if self.0.matches(v) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong cluster secret")),
            None => Err(Status::unauthenticated("no cluster secret presented")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_refuses_missing_and_wrong_secret() {
        let good = Secret::new("s3cret").unwrap();
        let mut check = Check(good.clone());
        assert_eq!(
            check.call(Request::new(())).unwrap_err().message(),
            "no cluster secret presented"
        );
        let req = Present(Secret::new("other").unwrap())
            .call(Request::new(()))
            .unwrap();
        assert_eq!(
            check.call(req).unwrap_err().message(),
            "wrong cluster secret"
        );
        let req = Present(good).call(Request::new(())).unwrap();
        assert!(check.call(req).is_ok());
        assert!(Secret::new(" \n").is_err());
    }
}
