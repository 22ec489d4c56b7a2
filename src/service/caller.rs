//! Authentication at the gRPC edge: every call to the metadata services
//! passes through [`Authenticate`], which leaves the [`Caller`] in the
//! request's extensions for the handlers.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::auth::{Authenticator, Caller};

#[derive(Clone)]
pub struct Authenticate(pub Arc<Authenticator>);

impl Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        match self.0.authenticate(header) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Ok(request)
            }
            Err(err) => {
                // The reason only; the header itself is a credential.
                tracing::info!(reason = %err, "call refused: not authenticated");
                Err(err.into())
            }
        }
    }
}

/// The caller [`Authenticate`] found; a request that did not pass through it
/// is a wiring mistake, refused rather than trusted.
pub fn caller(extensions: &tonic::Extensions) -> Result<Caller, Status> {
    extensions
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| super::error::internal("call was not authenticated"))
}
