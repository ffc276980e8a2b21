//! Which context a client call is for.

use myelin_proto::errors::ErrorCode;
use tonic::{Request, Status};

/// The context named by the client's `AxonIQ-Context` header (legacy `Context`), else `default`.
pub fn client_context<T>(request: &Request<T>) -> Result<String, Status> {
    let metadata = request.metadata();
    let value = metadata
        .get(myelin_proto::AXON_CONTEXT_KEY)
        .or_else(|| metadata.get("context"));
    let Some(value) = value else {
        return Ok(myelin_proto::DEFAULT_CONTEXT.to_owned());
    };
    let name = value
        .to_str()
        .map_err(|_| ErrorCode::InvalidContextName.status("the context header is not text"))?;
    if name.is_empty() {
        return Ok(myelin_proto::DEFAULT_CONTEXT.to_owned());
    }
    if name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(ErrorCode::InvalidContextName.status(format!("invalid context name {name:?}")));
    }
    Ok(name.to_owned())
}
