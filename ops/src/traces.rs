//! Distributed traces: `tracing` spans exported as OpenTelemetry spans over
//! OTLP/gRPC (`--otlp-endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`; off by default), and the W3C trace
//! context carried between our processes.
//!
//! The code only opens `tracing` spans (`embark.Lookup`, `store.read`,
//! `miss.publish`, `kfc.fill`, `retina.Embed`, `retina.fetch`, ...); the
//! `tracing-opentelemetry` layer installed by [`init`] turns them into
//! OpenTelemetry spans when an endpoint is set. Between processes the
//! context goes as W3C `traceparent`/`tracestate`: in gRPC metadata
//! ([`inject_metadata`], [`extract_metadata`]), in a miss event's
//! `trace_context` map (the local queue) and in Kafka message headers (the
//! miss topic), so one key's path from its miss to its fill is one trace.
//!
//! Sampling is parent-based: a trace started by a ranker keeps the
//! ranker's decision, and `--trace-sample-ratio` decides for traces that
//! start here.

use std::collections::HashMap;

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace flags every server binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// Export spans over OTLP/gRPC to this collector (e.g.
    /// http://127.0.0.1:4317). Off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Share of the traces that start in this process which are recorded
    /// (0 to 1); a trace started upstream keeps its own decision.
    #[arg(long, env = "EMBARK_TRACE_SAMPLE_RATIO", default_value_t = DEFAULT_SAMPLE_RATIO)]
    pub trace_sample_ratio: f64,
}

/// Every trace that starts here is recorded unless told otherwise: traces
/// are off until an endpoint is set, and who sets one wants to see them.
pub const DEFAULT_SAMPLE_RATIO: f64 = 1.0;

impl Default for TraceArgs {
    fn default() -> Self {
        Self { otlp_endpoint: None, trace_sample_ratio: DEFAULT_SAMPLE_RATIO }
    }
}

/// Why the trace exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--trace-sample-ratio {0} is not in [0, 1]")]
    SampleRatio(f64),
    #[error("the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The exporter of a process, flushed by [`Traces::shutdown`].
#[derive(Debug, Default)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is still buffered and stops the exporter (blocking,
    /// bounded by the exporter's timeout). Call at the end of the process.
    pub fn shutdown(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing the last spans failed");
        }
    }
}

/// The OpenTelemetry layer for `service`, when an endpoint is set (call in
/// a Tokio runtime: the exporter's gRPC channel lives on it).
pub(crate) fn layer<S>(
    args: &TraceArgs,
    service: &'static str,
) -> Result<(Option<impl tracing_subscriber::Layer<S>>, Traces), TraceError>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use opentelemetry_otlp::WithExportConfig;
    let Some(endpoint) = &args.otlp_endpoint else {
        return Ok((None, Traces::default()));
    };
    if !(0.0..=1.0).contains(&args.trace_sample_ratio) {
        return Err(TraceError::SampleRatio(args.trace_sample_ratio));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|source| TraceError::Exporter { endpoint: endpoint.clone(), source })?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(args.trace_sample_ratio))))
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = provider.tracer(service);
    let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_tracked_inactivity(false);
    Ok((Some(layer), Traces { provider: Some(provider) }))
}

/// A trace context as text: W3C `traceparent` (and `tracestate`), the
/// carrier every hop uses (gRPC metadata, Kafka headers, a queued miss).
pub type TraceCarrier = HashMap<String, String>;

/// The current span's context as a carrier; empty when nothing is traced
/// (no exporter, or not sampled), so untraced misses carry no bytes.
pub fn current_carrier() -> TraceCarrier {
    let cx = tracing::Span::current().context();
    let mut carrier = TraceCarrier::new();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    }
    carrier
}

fn context_of<'a>(carrier: impl Iterator<Item = (&'a str, &'a str)>) -> Option<Context> {
    let map: HashMap<&str, &str> = carrier.collect();
    struct Carrier<'a>(HashMap<&'a str, &'a str>);
    impl Extractor for Carrier<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).copied()
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().copied().collect()
        }
    }
    let cx = TraceContextPropagator::new().extract(&Carrier(map));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` (not yet entered) a child of the context in `carrier`
/// (header name, value pairs); returns whether there was one.
pub fn set_parent<'a>(span: &tracing::Span, carrier: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
    match context_of(carrier) {
        Some(cx) => span.set_parent(cx).is_ok(),
        None => false,
    }
}

/// Links `span` to the context in `carrier` (a batch's other messages).
pub fn add_link<'a>(span: &tracing::Span, carrier: impl Iterator<Item = (&'a str, &'a str)>) {
    if let Some(cx) = context_of(carrier) {
        span.add_link(cx.span().span_context().clone());
    }
}

/// Puts the current span's context into a gRPC request's metadata.
pub fn inject_metadata(metadata: &mut tonic::metadata::MetadataMap) {
    struct Metadata<'a>(&'a mut tonic::metadata::MetadataMap);
    impl Injector for Metadata<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                tonic::metadata::MetadataValue::try_from(value.as_str()),
            ) {
                self.0.insert(k, v);
            }
        }
    }
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut Metadata(metadata));
    }
}

/// Makes `span` a child of the context a gRPC caller sent in `metadata`.
pub fn extract_metadata(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) -> bool {
    let fields = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| metadata.get(name).and_then(|v| v.to_str().ok()).map(|v| (name, v)));
    set_parent(span, fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carrier_without_a_valid_traceparent_gives_no_parent() {
        assert!(context_of(std::iter::empty()).is_none());
        assert!(context_of([("traceparent", "garbage")].into_iter()).is_none());
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = context_of([("traceparent", valid)].into_iter()).expect("a valid traceparent");
        assert_eq!(cx.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn nothing_is_carried_outside_a_recorded_trace() {
        assert!(current_carrier().is_empty());
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject_metadata(&mut metadata);
        assert!(metadata.is_empty());
    }

    #[test]
    fn a_sample_ratio_outside_zero_to_one_is_refused() {
        let args = TraceArgs { otlp_endpoint: Some("http://127.0.0.1:4317".into()), trace_sample_ratio: 1.5 };
        let refused = layer::<tracing_subscriber::Registry>(&args, "test").err();
        assert!(matches!(refused, Some(TraceError::SampleRatio(_))));
    }
}
