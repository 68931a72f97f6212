//! The broker permissions of `deploy/rabbitmq/definitions.json` (what
//! docker-compose.yml loads), applied to throwaway users on a throwaway vhost
//! of the real RabbitMQ: the services can do their work with theirs, and
//! ImageGene's user can publish generation events and nothing else, so a
//! leaked ImageGene password cannot forge jobs, read queues or reshape the
//! topology.

use lapin::{
    BasicProperties, Confirmation,
    options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::FieldTable,
};
use penora_config::Secret;
use penora_domain::messages::{EVENTS_EXCHANGE, JOBS_EXCHANGE, SAVE_PROJECT};
use penora_platform::broker::{self, Outgoing, Publisher, Topology};
use serde_json::{Value, json};

const MANAGEMENT: &str = "http://127.0.0.1:15672/api";

struct Broker {
    http: reqwest::Client,
    vhost: String,
    users: Vec<String>,
}

impl Broker {
    async fn put(&self, path: &str, body: Value) {
        let r = self
            .http
            .put(format!("{MANAGEMENT}{path}"))
            .basic_auth("guest", Some("guest"))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!("the RabbitMQ management API is not reachable at {MANAGEMENT} ({e}); scripts/services.sh enables it")
            });
        assert!(r.status().is_success(), "PUT {path}: {}", r.status());
    }

    /// A user on the test vhost with the permissions `definitions.json` gives `role`.
    async fn user_like(&mut self, role: &str) -> String {
        let definitions: Value =
            serde_json::from_str(include_str!("../../../deploy/rabbitmq/definitions.json"))
                .expect("definitions.json is JSON");
        let permission = definitions["permissions"]
            .as_array()
            .expect("permissions")
            .iter()
            .find(|p| p["user"] == role)
            .unwrap_or_else(|| panic!("no permissions for {role}"))
            .clone();
        let name = format!("{}_{role}", self.vhost);
        self.put(
            &format!("/users/{name}"),
            json!({"password": "pw", "tags": ""}),
        )
        .await;
        self.put(
            &format!("/permissions/{}/{name}", self.vhost),
            json!({"configure": permission["configure"], "write": permission["write"], "read": permission["read"]}),
        )
        .await;
        self.users.push(name.clone());
        format!("amqp://{name}:pw@127.0.0.1:5672/{}", self.vhost)
    }

    async fn remove(self) {
        for path in self
            .users
            .iter()
            .map(|u| format!("/users/{u}"))
            .chain([format!("/vhosts/{}", self.vhost)])
        {
            let _ = self
                .http
                .delete(format!("{MANAGEMENT}{path}"))
                .basic_auth("guest", Some("guest"))
                .send()
                .await;
        }
    }
}

/// Publishes one message with confirms; whether the broker took it.
async fn publish(url: &str, exchange: &str, key: &str) -> bool {
    let Ok(connection) = broker::connect(url, "permissions-test").await else {
        return false;
    };
    let Ok(channel) = connection.create_channel().await else {
        return false;
    };
    if channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .is_err()
    {
        return false;
    }
    let confirm = match channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
    {
        Ok(confirm) => confirm.await,
        Err(e) => Err(e),
    };
    let _ = connection.close(200, "bye".into()).await;
    matches!(confirm, Ok(Confirmation::Ack(_)))
}

#[tokio::test]
async fn imagegene_may_only_publish_events_and_the_services_can_do_their_work() {
    let mut b = Broker {
        http: reqwest::Client::new(),
        vhost: format!("t{}", &uuid_like()),
        users: Vec::new(),
    };
    b.put(&format!("/vhosts/{}", b.vhost), json!({})).await;
    let service = b.user_like("penora").await;
    let imagegene = b.user_like("imagegene").await;
    // The checks run in their own task so that the vhost and the users are
    // removed even when one fails.
    let checks = tokio::spawn(check_permissions(service, imagegene)).await;
    b.remove().await;
    if let Err(failure) = checks {
        std::panic::resume_unwind(failure.into_panic());
    }
}

async fn check_permissions(service: String, imagegene: String) {
    // The services: declare the topology, publish a job, take it back.
    let settings = penora_config::Broker::from_lookup(|k| match k {
        "AMQP_URL" => Some(service.clone()),
        _ => None,
    })
    .expect("settings");
    let topology = Topology::from_settings(&settings);
    let publisher = Publisher::new(
        Secret::new(service.clone()),
        "permissions-test",
        topology.clone(),
    );
    publisher
        .publish_all(vec![Outgoing {
            exchange: topology.exchange(JOBS_EXCHANGE),
            routing_key: SAVE_PROJECT.into(),
            payload: b"{}".to_vec(),
            properties: BasicProperties::default(),
        }])
        .await
        .expect("the services publish a job");
    // A retry goes through the default exchange to a delay queue.
    assert!(publish(&service, "", &topology.retry_queue(SAVE_PROJECT, 1)).await);
    let connection = broker::connect(&service, "permissions-test")
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let job = channel
        .basic_get(
            topology.queue(SAVE_PROJECT).into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("the services read their queue");
    assert!(job.is_some());
    let _ = connection.close(200, "bye".into()).await;

    // ImageGene: events yes, anything else no.
    assert!(publish(&imagegene, EVENTS_EXCHANGE, "generation.failed").await);
    assert!(
        !publish(&imagegene, JOBS_EXCHANGE, SAVE_PROJECT).await,
        "forged a job"
    );
    assert!(
        !publish(&imagegene, "", &topology.queue(SAVE_PROJECT)).await,
        "forged a job via the default exchange"
    );
    let connection = broker::connect(&imagegene, "permissions-test")
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let read = channel
        .basic_get(
            topology.queue(SAVE_PROJECT).into(),
            BasicGetOptions { no_ack: true },
        )
        .await;
    assert!(read.is_err(), "read a work queue");
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            "sneaky".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(declared.is_err(), "declared a queue");
    let _ = connection.close(200, "bye".into()).await;
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}
