//! Logs and traces. [`init`] installs the process's `tracing` subscriber: log lines (text,
//! or JSON objects with the current span's fields, such as `request_id`) on stderr filtered
//! by `SIBYL_LOG`, and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, an OpenTelemetry layer
//! that exports spans over OTLP/gRPC. Trace context crosses roles as W3C `traceparent` in
//! gRPC metadata: [`inject`] on the client side, [`set_remote_parent`] on the server side.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::io::Stderr;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::{DefaultFields, Format};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// gRPC metadata key (and HTTP header) carrying a request's id from the gateway on.
pub const REQUEST_ID_KEY: &str = "x-request-id";

/// Environment variable that turns span export on (the OpenTelemetry standard one).
const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Keeps the span exporter alive; dropping it flushes the spans not yet sent.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(error) = provider.shutdown() {
                eprintln!("sibyl: flushing spans failed: {error}");
            }
        }
    }
}

/// Installs logging and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, span export for a
/// process running as `service` (the OpenTelemetry `service.name`, unless
/// `OTEL_SERVICE_NAME` says otherwise). Must run inside a Tokio runtime when exporting (the
/// gRPC channel lives on it). A second call in one process changes nothing.
pub fn init(service: &str, json: bool) -> Telemetry {
    let filter = log_filter("info");
    let logs = stderr_logs();
    let logs = if json {
        logs.json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed()
    } else {
        logs.with_filter(filter).boxed()
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let (provider, export_error) = match std::env::var(ENDPOINT_VAR) {
        Ok(endpoint) if !endpoint.is_empty() => match exporter(service) {
            Ok(provider) => (Some(provider), None),
            Err(error) => (
                None,
                Some(format!("cannot export spans to {endpoint}: {error}")),
            ),
        },
        _ => (None, None),
    };
    let spans = provider.as_ref().map(|provider| {
        // Spans at INFO and above, whatever SIBYL_LOG says about log lines (the libraries
        // sibyl uses make their spans at DEBUG and TRACE).
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("sibyl"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .is_ok();
    if let Some(error) = export_error {
        tracing::error!("{error}");
    }
    if let (true, Some(provider)) = (installed, &provider) {
        opentelemetry::global::set_tracer_provider(provider.clone());
        tracing::info!(service, "exporting spans over OTLP");
    }
    Telemetry {
        provider: provider.filter(|_| installed),
    }
}

/// Installs logging on stderr for a command a person runs (`generate`, `bench`, `index`):
/// warnings only, unless `SIBYL_LOG` says otherwise; no span export. A second call in one
/// process changes nothing.
pub fn init_command() {
    let _ = tracing_subscriber::registry()
        .with(stderr_logs().with_filter(log_filter("warn")))
        .try_init();
}

/// What `SIBYL_LOG` asks for, else `default`.
fn log_filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_env("SIBYL_LOG").unwrap_or_else(|_| EnvFilter::new(default))
}

/// Log lines on stderr; colours only for a person at a terminal, not in `docker logs` or a
/// log collector.
fn stderr_logs<S>() -> tracing_subscriber::fmt::Layer<S, DefaultFields, Format, fn() -> Stderr>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr as fn() -> Stderr)
        .with_ansi(ansi)
}

fn exporter(service: &str) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes `span`'s trace context into outgoing gRPC metadata.
pub fn inject(span: &tracing::Span, metadata: &mut MetadataMap) {
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// Makes `span` a child of the trace context in incoming gRPC metadata, if there is one.
pub fn set_remote_parent(span: &tracing::Span, metadata: &MetadataMap) {
    let context = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&MetadataExtractor(metadata))
    });
    use opentelemetry::trace::TraceContextExt;
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// The request id in incoming metadata: printable ASCII, at most 128 bytes; else empty.
pub fn request_id(metadata: &MetadataMap) -> String {
    metadata
        .get(REQUEST_ID_KEY)
        .and_then(|value| value.to_str().ok())
        .filter(|id| id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_default()
        .to_string()
}

/// Adds a request id to outgoing metadata (ids that are not valid metadata are left out).
pub fn set_request_id(metadata: &mut MetadataMap, id: &str) {
    if let Ok(value) = MetadataValue::try_from(id) {
        metadata.insert(REQUEST_ID_KEY, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_travel_and_bad_ones_are_dropped() {
        let mut metadata = MetadataMap::new();
        set_request_id(&mut metadata, "req-0123");
        assert_eq!(request_id(&metadata), "req-0123");
        let mut bad = MetadataMap::new();
        set_request_id(&mut bad, &"x".repeat(200));
        assert_eq!(request_id(&bad), "");
    }

    #[test]
    fn trace_context_round_trips_through_metadata() {
        use opentelemetry::trace::TraceContextExt;
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let propagator = TraceContextPropagator::new();
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let span_id = SpanId::from_hex("00f067aa0ba902b7").unwrap();
        let remote = SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            true,
            TraceState::NONE,
        );
        let context = opentelemetry::Context::new().with_remote_span_context(remote);
        let mut metadata = MetadataMap::new();
        use opentelemetry::propagation::TextMapPropagator;
        propagator.inject_context(&context, &mut MetadataInjector(&mut metadata));
        assert_eq!(
            metadata.get("traceparent").unwrap().to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let back = propagator.extract(&MetadataExtractor(&metadata));
        assert_eq!(back.span().span_context().trace_id(), trace_id);
    }
}
