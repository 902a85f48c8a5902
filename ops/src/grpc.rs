//! What every gRPC server of the project adds to its own services: the
//! standard health service, reflection (so `grpcurl` works without .proto
//! files), and transport settings tuned for large responses.

use std::time::Duration;

use tonic::transport::Server;

/// A server builder with the project's transport settings.
///
/// Responses carry matrices of hundreds of KiB: larger HTTP/2 windows and
/// frames let one response go out without waiting on window updates;
/// TCP_NODELAY keeps small replies from waiting on Nagle; keepalives find
/// dead peers.
pub fn server_builder(concurrency_per_connection: usize, request_timeout: Duration) -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .max_frame_size(Some((1 << 20) - 1))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .concurrency_limit_per_connection(concurrency_per_connection)
        .timeout(request_timeout)
}

/// Reflection services (v1 and v1alpha, for older grpcurl) over the
/// encoded descriptor set.
pub fn reflection(
    descriptors: &'static [u8],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptors)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptors)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// Accepted connections of `listener`, with TCP_NODELAY set on each.
///
/// `Server::tcp_nodelay` applies only when tonic binds the port itself. A
/// server that binds its own listener (to know the bound address first)
/// must set it per connection, or each small reply waits ~40 ms for the
/// peer's delayed ACK (Nagle).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
