//! Per-subscription options, as granted by the broker in SUBACK.
//!
//! The router stores these verbatim and hands them back in match results; it
//! never interprets them (except that no field influences matching). Acting on
//! QoS downgrade, `no_local`, `retain_as_published`, `retain_handling` and
//! subscription identifiers is the broker's job.

/// The options of one subscription (MQTT 5.0 section 3.8.3.1).
///
/// `Default` is QoS 0, every flag off, retain handling 0, no identifier, which
/// is also what an MQTT 3.1.1 subscription amounts to apart from its QoS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct SubscriptionOptions {
    /// Granted maximum QoS, `0..=2`.
    pub qos: u8,
    /// Do not deliver the subscriber's own publications to it (MQTT-3.8.3-3).
    pub no_local: bool,
    /// Keep the RETAIN flag as published when forwarding (MQTT-3.3.1-12/13).
    pub retain_as_published: bool,
    /// When to send retained messages at subscribe time: 0, 1 or 2.
    pub retain_handling: u8,
    /// The subscription identifier, if the SUBSCRIBE carried one.
    pub subscription_id: Option<u32>,
}

impl SubscriptionOptions {
    /// Options with the given maximum QoS and everything else at its default.
    pub fn with_qos(qos: u8) -> Self {
        Self {
            qos,
            ..Self::default()
        }
    }
}
