use futures_lite::StreamExt;
use lapin::{BasicProperties, Connection, ConnectionProperties, options::*, types::FieldTable};

#[tokio::test]
async fn in_process_publish_consume() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = broker_core::BrokerConfig::default();
    cfg.auth = false;
    let broker = broker_core::broker::Broker::new(cfg, broker_core::auth::UserDb::default());
    tokio::spawn(broker_core::server::run(broker, vec![listener], std::future::pending()));
    let conn = Connection::connect(&format!("amqp://guest:guest@127.0.0.1:{port}/%2f"), ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("q".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..10 {
        ch.basic_publish("".into(), "q".into(), BasicPublishOptions::default(), format!("m{i}").as_bytes(), BasicProperties::default().with_delivery_mode(2)).await.unwrap().await.unwrap();
    }
    let mut consumer = ch.basic_consume("q".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    for i in 0..10 {
        let d = consumer.next().await.unwrap().unwrap();
        assert_eq!(d.data, format!("m{i}").as_bytes());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    conn.close(200, "bye".into()).await.unwrap();
}
