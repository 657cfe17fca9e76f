//! An incoming PUBLISH: topic alias, topic and payload checks, permission,
//! then the route to subscribers, and the acknowledgement the QoS asks for
//! once what it changed is stored.

use super::*;

impl Connection {
    pub(super) fn on_publish(
        &mut self,
        session: &Arc<Session>,
        mut publish: Publish,
    ) -> Result<(), Exit> {
        let v5 = self.protocol.is_v5();
        if v5 && !publish.properties().subscription_identifiers.is_empty() {
            return Err(self.protocol_error("PUBLISH from a client with a subscription identifier"));
        }
        // A Response Topic is a topic name (MQTT-3.3.2-13, -14), and a topic
        // name has at least one character (MQTT-4.7.3-1). Checked here, not
        // in the codec, which also reads the messages a store kept.
        if v5 && is_empty_response_topic(publish.properties().response_topic.as_ref()) {
            return Err(self.protocol_error("PUBLISH with an empty Response Topic"));
        }
        let topic = self.resolve_topic(&mut publish)?;
        let topic_str = std::str::from_utf8(&topic).unwrap_or("");
        // The topic this connection last routed to passed the checks below
        // then; a client publishing to one topic is not checked again.
        let checked = self
            .recent_route
            .as_ref()
            .is_some_and(|recent| recent.topic() == topic_str);
        if !checked && validate_topic_name(topic_str).is_err() {
            Metrics::inc(&self.broker.metrics.protocol_errors);
            return Err(Exit::Error(
                ReasonCode::TopicNameInvalid,
                format!("invalid topic name {topic_str:?}").into(),
            ));
        }
        if !checked && self.broker.config.limits.too_many_levels(topic_str) {
            Metrics::inc(&self.broker.metrics.protocol_errors);
            return Err(Exit::Error(
                ReasonCode::TopicNameInvalid,
                "topic name with more than limits.max_topic_levels levels".into(),
            ));
        }
        if v5
            && self.broker.config.mqtt.check_payload_format
            && misstates_utf8(
                publish.properties().payload_format_indicator,
                &publish.payload,
            )
        {
            // MQTT-3.3.2-4 allows refusing it: an ack with 0x99, or for QoS 0
            // (which has no ack) closing with 0x99.
            Metrics::inc(&self.broker.metrics.publishes_denied);
            let ack = PubAck {
                packet_id: publish.packet_id.unwrap_or(0),
                code: ReasonCode::PayloadFormatInvalid,
                ..PubAck::default()
            };
            match publish.qos {
                QoS::AtMostOnce => {
                    return Err(Exit::Error(
                        ReasonCode::PayloadFormatInvalid,
                        "payload is not the UTF-8 its format indicator says".into(),
                    ))
                }
                QoS::AtLeastOnce => self.acknowledge(Packet::PubAck(ack), Journal::new()),
                QoS::ExactlyOnce => self.acknowledge(Packet::PubRec(ack), Journal::new()),
            }
            return Ok(());
        }
        // Topics starting with '$' belong to the broker ($SYS, $share ...);
        // the others to whom the ACL (if any) gives them.
        let why = if topic_str.starts_with('$') {
            Some("publish to a $ topic denied")
        } else if self
            .acl
            .as_deref()
            .is_some_and(|acl| !acl.may_publish(topic_str))
        {
            Some("publish denied by the ACL")
        } else {
            None
        };
        let denied = why.is_some();
        if let Some(why) = why {
            Metrics::inc(&self.broker.metrics.publishes_denied);
            tracing::debug!(client_id = %session.client_id, topic = topic_str, "{why}");
        }
        let mut journal = Journal::new();
        let (qos, packet_id) = (publish.qos, publish.packet_id);
        // Called at most once: topic, payload and properties move into the
        // message (no reference count taken on the read buffer but theirs).
        let route = move |this: &mut Self, journal: &mut Journal| {
            if !denied {
                let message = Message::new(
                    topic,
                    publish.payload,
                    publish.qos,
                    publish.retain,
                    publish.properties,
                    session.id,
                );
                let full = this.broker.publish_from_client(
                    &message,
                    journal,
                    &mut this.recent_route,
                    &mut this.staged,
                );
                // A client publishing to its own full queue would wait for
                // its own acknowledgements, which it is not read for.
                this.full_queue = full.filter(|s| !Arc::ptr_eq(s, session));
            }
        };
        let code = if denied {
            ReasonCode::NotAuthorized
        } else {
            ReasonCode::Success
        };
        match (qos, packet_id) {
            (QoS::AtMostOnce, _) => {
                route(self, &mut journal);
                // A retained message is stored; nobody waits for it.
                self.broker.commit(journal);
            }
            (QoS::AtLeastOnce, Some(packet_id)) => {
                route(self, &mut journal);
                self.acknowledge(
                    Packet::PubAck(PubAck {
                        packet_id,
                        code,
                        ..PubAck::default()
                    }),
                    journal,
                );
            }
            (QoS::ExactlyOnce, Some(packet_id)) => {
                let mut opened = false;
                if !denied {
                    // MQTT 3.x has no Receive Maximum to tell the client:
                    // its flows are bounded by its packet ids alone (each
                    // holds an id, the message went on at its PUBLISH), as
                    // in Mosquitto, and a client that opens more than ours
                    // (MQTT.js does) is not cut off.
                    let limit = if self.protocol.is_v5() {
                        self.broker.config.limits.receive_maximum
                    } else {
                        u16::MAX
                    };
                    match session.incoming_qos2(packet_id, limit, &mut journal) {
                        Ok(true) => {
                            opened = true;
                            route(self, &mut journal);
                        }
                        // Sent again: acknowledged once the first copy's
                        // batch, perhaps committed by an earlier connection
                        // and still being written, is durable.
                        Ok(false) => journal.after_earlier(),
                        Err(_) => {
                            Metrics::inc(&self.broker.metrics.protocol_errors);
                            return Err(Exit::Error(
                                ReasonCode::ReceiveMaximumExceeded,
                                "more QoS 2 messages in flight than Receive Maximum".into(),
                            ));
                        }
                    }
                }
                let pubrec = Packet::PubRec(PubAck {
                    packet_id,
                    code,
                    ..PubAck::default()
                });
                // A copy sent again is acknowledged only if the first one
                // was stored: a failure abandoned its flow meanwhile.
                let first = (!opened && !denied).then(|| Arc::clone(session));
                let session = Arc::clone(session);
                self.acknowledge_then(
                    pubrec,
                    journal,
                    move || first.is_none_or(|s| s.has_incoming_qos2(packet_id)),
                    move |stored| {
                        // The flow this PUBLISH opened ends with the
                        // failure; see `Session::abandon_incoming_qos2`.
                        if opened && !stored {
                            session.abandon_incoming_qos2(packet_id);
                        }
                    },
                );
            }
            _ => return Err(self.protocol_error("QoS > 0 PUBLISH without a packet identifier")),
        }
        Ok(())
    }

    /// Resolves an MQTT 5 topic alias (MQTT-3.3.2-7 .. 3.3.2-12).
    /// Takes the topic out of `publish`, or the one its alias stands for.
    fn resolve_topic(&mut self, publish: &mut Publish) -> Result<Bytes, Exit> {
        let Some(alias) = publish.properties().topic_alias else {
            return Ok(std::mem::take(&mut publish.topic));
        };
        let maximum = if self.protocol.is_v5() {
            self.broker.config.limits.topic_alias_maximum
        } else {
            0
        };
        self.topic_aliases
            .get_or_insert_with(|| Box::new(InboundAliases::new(maximum)))
            .resolve(alias, &publish.topic)
            .map_err(|e| match e {
                AliasError::OutOfRange(_) => {
                    Metrics::inc(&self.broker.metrics.protocol_errors);
                    Exit::Error(ReasonCode::TopicAliasInvalid, e.to_string().into())
                }
                AliasError::Unknown(_) => self.protocol_error(&e.to_string()),
            })
    }
}
