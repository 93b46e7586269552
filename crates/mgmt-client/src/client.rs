//! One management connection: a lapin connection, a channel, an exclusive auto-named reply
//! queue and its consumer. It sends requests as `docs/management-protocol.md` specifies and
//! collects their answers; what a request means is the business of `operations`.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{
    AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo, SASLMechanism,
};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::{Value, json};

use crate::{BrokerAddress, Error};

/// The protocol version this client speaks.
pub const PROTOCOL_VERSION: u64 = 1;
/// How long a call may take when the caller says nothing.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The broker object's id, target of every method but the HA ones.
pub const BROKER_OBJECT: &str = "org.apache.qpid.broker:broker:amqp-broker";

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub address: BrokerAddress,
    /// Bounds the connect (TCP and AMQP handshake) and each call; `None` waits forever.
    pub timeout: Option<Duration>,
    /// Sets the client property `qpid.ha-admin`, so an HA backup lets the connection in.
    pub ha_admin: bool,
    /// `PLAIN` (the default), `AMQPLAIN`, `ANONYMOUS` or `EXTERNAL`.
    pub sasl_mechanism: Option<String>,
    /// The connection name the broker shows (`qpid-config`, `qpid-ha`).
    pub client_name: String,
}

impl ConnectOptions {
    pub fn new(address: BrokerAddress) -> ConnectOptions {
        ConnectOptions {
            address,
            timeout: Some(DEFAULT_TIMEOUT),
            ha_admin: false,
            sasl_mechanism: None,
            client_name: "qpid-config".into(),
        }
    }
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// `_method_request` on `object` (an object name).
    Method {
        object: String,
        name: String,
        arguments: Value,
    },
    /// `_query_request` for every object of `class`.
    QueryClass { class: String },
}

/// A live management connection.
pub struct Client {
    connection: Connection,
    channel: Channel,
    reply_queue: String,
    replies: Consumer,
    timeout: Option<Duration>,
    next_correlation_id: u64,
}

async fn bounded<T>(
    timeout: Option<Duration>,
    what: &str,
    future: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match timeout {
        None => future.await,
        Some(limit) => tokio::time::timeout(limit, future)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout(format!(
                    "{what}: no answer within {:.1} s",
                    limit.as_secs_f64()
                )))
            }),
    }
}

impl Client {
    /// Connects, opens a channel and sets up the reply queue, all within the timeout.
    pub async fn connect(options: &ConnectOptions) -> Result<Client, Error> {
        let what = format!(
            "connecting to {}:{}",
            options.address.host, options.address.port
        );
        bounded(options.timeout, &what, Client::connect_unbounded(options)).await
    }

    /// Opens a connection and a channel (no management request), within the timeout:
    /// `qpid-ha ping`.
    pub async fn ping(options: &ConnectOptions) -> Result<(), Error> {
        let what = format!(
            "connecting to {}:{}",
            options.address.host, options.address.port
        );
        let timeout = options.timeout;
        bounded(timeout, &what, async {
            let (connection, _channel) = open(options).await?;
            let _ = connection.close(200, "OK".into()).await;
            Ok(())
        })
        .await
    }

    async fn connect_unbounded(options: &ConnectOptions) -> Result<Client, Error> {
        let (connection, channel) = open(options).await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| Error::from_lapin(&e, "declaring the reply queue"))?;
        let reply_queue = queue.name().as_str().to_string();
        let replies = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| Error::from_lapin(&e, "consuming from the reply queue"))?;
        Ok(Client {
            connection,
            channel,
            reply_queue,
            replies,
            timeout: options.timeout,
            next_correlation_id: 0,
        })
    }

    /// The name of this client's own reply queue (listings usually leave it out).
    pub fn reply_queue(&self) -> &str {
        &self.reply_queue
    }

    /// Runs one operation.
    pub async fn run<O: crate::Operation>(&mut self, operation: &O) -> Result<O::Output, Error> {
        let reply = self.request(&operation.request()).await?;
        operation.parse(reply)
    }

    /// Sends `request` and waits (within the timeout) for its whole answer: the method's
    /// out-arguments, or every object of every `partial` query message.
    pub async fn request(&mut self, request: &Request) -> Result<Value, Error> {
        let timeout = self.timeout;
        bounded(
            timeout,
            "waiting for the broker",
            self.request_unbounded(request),
        )
        .await
    }

    async fn request_unbounded(&mut self, request: &Request) -> Result<Value, Error> {
        let (opcode, body) = match request {
            Request::Method {
                object,
                name,
                arguments,
            } => (
                "_method_request",
                json!({"version": PROTOCOL_VERSION, "_object_id": {"_object_name": object},
                       "_method_name": name, "_arguments": arguments}),
            ),
            Request::QueryClass { class } => (
                "_query_request",
                json!({"version": PROTOCOL_VERSION, "_what": "OBJECT",
                       "_schema_id": {"_class_name": class}}),
            ),
        };
        self.next_correlation_id += 1;
        let correlation_id = format!("qpid-config-{}", self.next_correlation_id);
        let mut headers = FieldTable::default();
        headers.insert(
            "qmf.opcode".into(),
            AMQPValue::LongString(LongString::from(opcode)),
        );
        let properties = BasicProperties::default()
            .with_reply_to(ShortString::from(self.reply_queue.as_str()))
            .with_correlation_id(ShortString::from(correlation_id.as_str()))
            .with_content_type("application/json".into())
            .with_headers(headers);
        self.channel
            .basic_publish(
                "qmf.default.direct".into(),
                "broker".into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                properties,
            )
            .await
            .map_err(|e| Error::from_lapin(&e, "publishing the request"))?;
        let mut objects = Vec::new();
        loop {
            let answer = self.receive(&correlation_id).await?;
            match answer.opcode.as_str() {
                "_exception" => {
                    let code = answer.body["error_code"].as_u64().unwrap_or(7);
                    let text = answer.body["error_text"]
                        .as_str()
                        .unwrap_or("no error text")
                        .to_string();
                    return Err(Error::from_exception(code, text));
                }
                "_method_response" => {
                    return Ok(answer.body["_arguments"].clone());
                }
                "_query_response" => {
                    if let Some(page) = answer.body["objects"].as_array() {
                        objects.extend(page.iter().cloned());
                    }
                    if !answer.partial {
                        return Ok(Value::Array(objects));
                    }
                }
                other => {
                    return Err(Error::Internal(format!(
                        "unexpected answer opcode '{other}'"
                    )));
                }
            }
        }
    }

    /// The next answer carrying `correlation_id`; answers to earlier requests (ones that
    /// timed out, say) are skipped.
    async fn receive(&mut self, correlation_id: &str) -> Result<Answer, Error> {
        loop {
            let delivery = match self.replies.next().await {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => return Err(Error::from_lapin(&e, "receiving an answer")),
                None => {
                    return Err(Error::Connection(
                        "the connection closed before the answer came".into(),
                    ));
                }
            };
            let properties = &delivery.properties;
            let matches = properties
                .correlation_id()
                .as_ref()
                .is_some_and(|c| c.as_str() == correlation_id);
            if !matches {
                continue;
            }
            let headers = properties.headers().clone().unwrap_or_default();
            let opcode = match headers.inner().get("qmf.opcode") {
                Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into(),
                Some(AMQPValue::ShortString(s)) => s.as_str().to_string(),
                _ => String::new(),
            };
            let partial = matches!(
                headers.inner().get("partial"),
                Some(AMQPValue::Boolean(true))
            );
            let body = serde_json::from_slice(&delivery.data)
                .map_err(|e| Error::Internal(format!("an answer that is not JSON: {e}")))?;
            return Ok(Answer {
                opcode,
                partial,
                body,
            });
        }
    }

    /// Closes the connection politely (bounded by the timeout); errors are ignored, since the
    /// work is done.
    pub async fn close(self) {
        let timeout = self.timeout.or(Some(DEFAULT_TIMEOUT));
        let _ = bounded(timeout, "closing", async {
            self.connection
                .close(200, "OK".into())
                .await
                .map_err(|e| Error::from_lapin(&e, "close"))
        })
        .await;
    }
}

/// A connection and a channel on it.
async fn open(options: &ConnectOptions) -> Result<(Connection, Channel), Error> {
    let address = &options.address;
    let mechanism = match &options.sasl_mechanism {
        Some(name) => Some(
            name.parse::<SASLMechanism>()
                .map_err(Error::InvalidRequest)?,
        ),
        None => None,
    };
    let uri = AMQPUri {
        scheme: AMQPScheme::AMQP,
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: address.user.clone(),
                password: address.password.clone(),
            },
            host: address.host.clone(),
            port: address.port,
        },
        vhost: address.vhost.clone(),
        query: AMQPQueryString {
            auth_mechanism: mechanism,
            ..Default::default()
        },
    };
    let mut properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(options.client_name.as_str()));
    if options.ha_admin {
        properties =
            properties.with_client_property(ShortString::from("qpid.ha-admin"), "true".into());
    }
    let target = format!("{}:{}", address.host, address.port);
    let connection = Connection::connect_uri(uri, properties)
        .await
        .map_err(|e| Error::from_lapin(&e, &format!("cannot connect to {target}")))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| Error::from_lapin(&e, "channel.open"))?;
    Ok((connection, channel))
}

struct Answer {
    opcode: String,
    partial: bool,
    body: Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Instant;

    fn options_for(port: u16, timeout: Duration) -> ConnectOptions {
        let mut options = ConnectOptions::new(
            BrokerAddress::parse(&format!("127.0.0.1:{port}")).expect("an address"),
        );
        options.timeout = Some(timeout);
        options
    }

    #[tokio::test]
    async fn a_peer_that_accepts_and_never_answers_is_a_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("its address").port();
        let holder = std::thread::spawn(move || {
            let accepted = listener.accept().expect("accept");
            std::thread::sleep(Duration::from_secs(2));
            drop(accepted);
        });
        let started = Instant::now();
        let result = Client::connect(&options_for(port, Duration::from_millis(300))).await;
        assert!(
            matches!(result, Err(Error::Timeout(_))),
            "{:?}",
            result.err()
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        holder.join().expect("the silent peer");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connection_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("its address")
            .port();
        let result = Client::connect(&options_for(port, Duration::from_secs(5))).await;
        assert!(
            matches!(result, Err(Error::Connection(_))),
            "{:?}",
            result.err()
        );
    }
}
