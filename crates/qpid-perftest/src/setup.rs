//! Set-up and clean-up through lapin: declare (or check) the queue before a run, delete it
//! afterwards. Nothing here is on the hot path.

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

/// A lapin connection with one channel, for set-up.
pub struct Setup {
    conn: Connection,
    channel: Channel,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Setup")
    }
}

impl Setup {
    /// Connects and opens a channel.
    pub async fn connect(uri: &str) -> anyhow::Result<Setup> {
        let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        Ok(Setup { conn, channel })
    }

    /// Declares the queue (durable when messages are persistent); returns its depth.
    pub async fn declare(&self, queue: &str, durable: bool) -> anyhow::Result<u32> {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(q.message_count())
    }

    /// Checks that the queue exists (passive declare); returns its depth.
    pub async fn check(&self, queue: &str) -> anyhow::Result<u32> {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(q.message_count())
    }

    /// Deletes the queue.
    pub async fn delete(&self, queue: &str) -> anyhow::Result<()> {
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
        Ok(())
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.conn.close(200, "bye".into()).await;
    }
}
