//! `loader-lambda`: the AWS Lambda function (custom runtime `provided.al2023`, deployed as
//! `bootstrap`). Built only with the `lambda` feature:
//!
//!   cargo build --release --features lambda --bin loader-lambda
//!
//! The handler and its pool are created once per execution environment, before the first
//! invocation; see `loader::lambda` for what it does with each event.

use lambda_runtime::{Diagnostic, Error, LambdaEvent, service_fn};
use loader::lambda::Handler;
use loader::logging::LogFormat;
use serde_json::Value;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    // CloudWatch takes one JSON object per line; LOADER_LOG_FORMAT=pretty for local runs.
    let pretty = std::env::var("LOADER_LOG_FORMAT").is_ok_and(|f| f == "pretty");
    loader::logging::init(Some(if pretty { LogFormat::Pretty } else { LogFormat::Json }));
    let handler: &'static Handler = Box::leak(Box::new(Handler::from_env()?));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        // The error text goes to the invocation result and the logs: it never holds a body. Its
        // errorType is a stable name (Handler::error_type), not a Rust type's.
        handler.handle(event.payload).await.map_err(|e| Diagnostic {
            error_type: Handler::error_type(&e).to_owned(),
            error_message: loader::display::error_line(&e),
        })
    }))
    .await
}
