//! A consumer/queue group member speaking the `Consume` call directly.
#![allow(dead_code)]

use std::time::Duration;

use tern::proto::v1 as pb;
use tern::proto::v1::consume_request::Kind as Up;
use tern::proto::v1::consume_response::Kind as Down;
use tern::proto::v1::tern_client::TernClient;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

pub struct GroupMember {
    tx: Option<mpsc::Sender<pb::ConsumeRequest>>,
    heartbeats: Option<tokio::task::JoinHandle<()>>,
    stream: tonic::Streaming<pb::ConsumeResponse>,
    pub member_id: String,
}

pub fn join_req(group: &str, topic: &str, mode: pb::GroupMode) -> pb::JoinGroup {
    pb::JoinGroup {
        group: group.into(),
        topic: topic.into(),
        mode: mode as i32,
        member_name: "test".into(),
        ..Default::default()
    }
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeats.take() {
            h.abort();
        }
    }
}

impl GroupMember {
    /// Joins through the node at `addr`; answers once the coordinator has the member, which
    /// then sends a heartbeat every second.
    pub async fn join(addr: &str, join: pb::JoinGroup) -> Result<GroupMember, tonic::Status> {
        let mut m = Self::join_silent(addr, join).await?;
        let tx = m.tx.clone().unwrap();
        m.heartbeats = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let hb = pb::ConsumeRequest {
                    kind: Some(Up::Heartbeat(pb::Heartbeat {})),
                };
                if tx.send(hb).await.is_err() {
                    return;
                }
            }
        }));
        Ok(m)
    }

    /// Joins without heartbeats: the member is silent unless the test sends something.
    pub async fn join_silent(
        addr: &str,
        join: pb::JoinGroup,
    ) -> Result<GroupMember, tonic::Status> {
        let mut c = TernClient::new(
            super::channel(addr)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?,
        );
        let (tx, rx) = mpsc::channel(64);
        tx.send(pb::ConsumeRequest {
            kind: Some(Up::Join(join)),
        })
        .await
        .unwrap();
        let mut stream = c
            .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        match stream.next().await {
            Some(Ok(pb::ConsumeResponse {
                kind: Some(Down::Joined(j)),
            })) => Ok(GroupMember {
                tx: Some(tx),
                heartbeats: None,
                stream,
                member_id: j.member_id,
            }),
            Some(Err(s)) => Err(s),
            other => panic!("expected Joined, got {other:?}"),
        }
    }

    /// Joins, retrying while the coordinator is not ready (an election, a restart).
    pub async fn join_retrying(addr: &str, join: pb::JoinGroup) -> GroupMember {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match Self::join(addr, join.clone()).await {
                Ok(m) => return m,
                Err(s)
                    if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::NotFound)
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(s) => panic!("join failed: {s:?}"),
            }
        }
    }

    /// The next message, or `None` when the call ended; waits at most `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Result<Down, tonic::Status>> {
        match tokio::time::timeout(wait, self.stream.next()).await {
            Err(_) => None,
            Ok(None) => None,
            Ok(Some(Err(s))) => Some(Err(s)),
            Ok(Some(Ok(m))) => m.kind.map(Ok),
        }
    }

    pub async fn send(&self, kind: Up) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(pb::ConsumeRequest { kind: Some(kind) }).await;
        }
    }

    pub async fn commit(&self, offsets: Vec<(u32, u64)>) {
        self.send(Up::Commit(pb::Commit {
            offsets: offsets
                .into_iter()
                .map(|(partition, offset)| pb::PartitionOffset { partition, offset })
                .collect(),
        }))
        .await
    }

    /// Commits and waits (bounded) until the coordinator says the offsets are replicated;
    /// messages in between are returned.
    pub async fn commit_and_wait(&mut self, offsets: Vec<(u32, u64)>) -> Vec<Down> {
        self.commit(offsets).await;
        let mut other = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            assert!(std::time::Instant::now() < deadline, "no Committed");
            match self.next(Duration::from_secs(1)).await {
                Some(Ok(Down::Committed(_))) => return other,
                Some(Ok(d)) => other.push(d),
                Some(Err(s)) => panic!("commit: {s:?}"),
                None => {}
            }
        }
    }

    pub async fn ack(&self, refs: &[(u32, u64)]) {
        self.send(Up::Ack(pb::Acks {
            deliveries: refs
                .iter()
                .map(|&(partition, offset)| pb::DeliveryRef { partition, offset })
                .collect(),
        }))
        .await
    }

    pub async fn nack(&self, refs: &[(u32, u64)], delay_ms: u32) {
        self.send(Up::Nack(pb::Nacks {
            deliveries: refs
                .iter()
                .map(|&(partition, offset)| pb::DeliveryRef { partition, offset })
                .collect(),
            delay_ms,
        }))
        .await
    }

    /// Leaves: closes its side and waits (bounded) for the coordinator to end the call.
    pub async fn leave(mut self) {
        self.tx = None;
        if let Some(h) = self.heartbeats.take() {
            h.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
    }
}
